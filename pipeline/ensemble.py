"""Blend the finished members of an ensemble run, chosen by validation.

    python -m pipeline.ensemble --run NAME [--device auto|cpu|gpu] [--tta]

Each member trained on its own split of train.csv, so each is judged only on the rows it held out:
a blend's estimate averages, row by row, the members of the blend that did not train on that row.
Candidates: the single best member, the mean of the top k, and greedy forward selection with
replacement (Caruana et al. 2004). The best estimate wins; runs/NAME/ gets ensemble.json (the blend,
its estimate, every candidate), test_probs.npz (for `submit`) and val_predictions.npz.

A member's test probabilities are cached in its folder with what they were made from (pipeline.runs):
the cache is used only when the test data and the member's model are the ones of now.
"""
import json
import sys
import warnings

import numpy as np

from pipeline import dataset, runs
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import save_npz, write_json

TEST_CACHE = {False: "test_probs.npz", True: "test_probs_tta.npz"}

TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dy, dx) in pixels


def finished_members(folder):
    """Member folders whose training finished; the others are skipped with a warning."""
    done, skipped = runs.run_of(folder).finished_members()
    done = [m.folder for m in done]
    if skipped:
        warnings.warn(f"runs/{folder.name}: skipping unfinished members {', '.join(skipped)}", stacklevel=2)
    if not done:
        raise UserError(f"runs/{folder.name}: no member has finished training yet")
    return done, skipped


def shift_images(x, dy, dx):
    """Shift NHWC images by whole pixels, filling with background (0)."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def predict_probs(member, x, xp=np):
    return runs.run_of(member).predict_probs(x, xp)


def tta_probs(member, x, xp):
    """Mean probabilities over the TTA shifts."""
    return np.mean([predict_probs(member, shift_images(x, dy, dx), xp) for dy, dx in TTA_SHIFTS], axis=0)


def member_outputs(member, x_train, x_test, xp, tta):
    """(val_idx, val_y, val_probs, test_probs) of one member; test probabilities are cached in its folder."""
    run = runs.run_of(member)
    idx, y, val_probs = run.val_predictions()
    if len(idx) and (idx.min() < 0 or idx.max() >= len(x_train)):
        raise UserError(f"{member / 'val_predictions.npz'} indexes rows beyond train.npz (the data changed since "
                        f"it was trained): retrain runs/{run.root.name} on this data, or prepare the old data again")
    test = run.cached_probs(TEST_CACHE[tta], len(x_test))
    if test is None:  # missing, damaged, or made from other data or another model: recompute
        test = tta_probs(member, x_test, xp) if tta else predict_probs(member, x_test, xp)
        run.write_probs(test, TEST_CACHE[tta])
    if tta:
        val_probs = tta_probs(member, x_train[idx], xp)
    return idx, y, val_probs, test


def holdout_stack(outputs, n_rows):
    """Stack members' validation probabilities on the rows of train.csv.

    Returns P float32 (K, n_rows, 10) (zero where a member trained on the row), H bool (K, n_rows) (the
    member held the row out) and y int64 (n_rows,) (-1 where no member held it out).
    """
    k = len(outputs)
    P = np.zeros((k, n_rows, dataset.NUM_CLASSES), np.float32)
    H = np.zeros((k, n_rows), bool)
    y = np.full(n_rows, -1, np.int64)
    for i, (idx, labels, probs) in enumerate(outputs):
        P[i, idx], H[i, idx], y[idx] = probs, True, labels
    return P, H, y


def blend_estimate(weights, P, H, y):
    """Accuracy and log loss of a weighted blend, each row scored only by the members that held it out."""
    w = np.asarray(weights, np.float64)[:, None] * H  # (K, n)
    norm = w.sum(axis=0)
    rows = norm > 0
    if not rows.any():
        return {"accuracy": 0.0, "log_loss": float("inf"), "rows": 0}
    blend = np.einsum("kn,knc->nc", w[:, rows], P[:, rows]) / norm[rows, None]
    truth = y[rows]
    p_true = np.clip(blend[np.arange(len(truth)), truth], 1e-12, 1.0)
    return {"accuracy": float((blend.argmax(1) == truth).mean()), "log_loss": float(-np.log(p_true).mean()),
            "rows": int(rows.sum())}


def _key(est):
    return est["accuracy"], -est["log_loss"]


def candidates(P, H, y, rounds=None):
    """Every candidate blend: [(name, weights, estimate)], best single member first."""
    k = len(P)
    singles = [blend_estimate(np.eye(k)[i], P, H, y) for i in range(k)]
    order = sorted(range(k), key=lambda i: _key(singles[i]), reverse=True)
    out = [("best single", np.eye(k)[order[0]], singles[order[0]])]
    for top in range(2, k + 1):
        w = np.zeros(k)
        w[order[:top]] = 1.0
        out.append((f"mean of top {top}", w, blend_estimate(w, P, H, y)))
    w, best = greedy_selection(P, H, y, order[0], rounds or 2 * k)
    out.append(("greedy selection", w, best))
    return out


def greedy_selection(P, H, y, start, rounds):
    """Caruana's forward selection with replacement, from the best member, while the estimate improves."""
    w = np.zeros(len(P))
    w[start] = 1.0
    best = blend_estimate(w, P, H, y)
    for _ in range(rounds):
        trials = []
        for i in range(len(P)):
            trial = w.copy()
            trial[i] += 1.0
            trials.append((_key(blend_estimate(trial, P, H, y)), i))
        score, i = max(trials)
        if score <= _key(best):
            break
        w[i] += 1.0
        best = blend_estimate(w, P, H, y)
    return w, best


def choose(P, H, y):
    """The candidate with the best estimate (ties go to the earlier, simpler one)."""
    cands = candidates(P, H, y)
    best = max(range(len(cands)), key=lambda i: (_key(cands[i][2]), -i))
    return cands[best], cands


def build(folder, xp=np, tta=False):
    """Select the blend of runs/NAME's members and write ensemble.json, test_probs.npz, val_predictions.npz."""
    members, skipped = finished_members(folder)
    x_train, _ = dataset.load_train()
    x_test = dataset.load_test_images()
    variants = [False, True] if tta else [False]
    results = []
    for use_tta in variants:
        outs = [member_outputs(m, x_train, x_test, xp, use_tta) for m in members]
        P, H, y = holdout_stack([(idx, yy, vp) for idx, yy, vp, _ in outs], len(x_train))
        (name, weights, est), cands = choose(P, H, y)
        results.append((use_tta, name, weights, est, cands, outs, P, H, y))
    use_tta, name, weights, est, cands, outs, P, H, y = max(results, key=lambda r: (_key(r[3]), not r[0]))

    test = np.tensordot(weights / weights.sum(), np.stack([o[3] for o in outs]), axes=1).astype(np.float32)
    w = weights[:, None] * H
    rows = np.flatnonzero(w.sum(0) > 0)
    val_blend = np.einsum("kn,knc->nc", w[:, rows], P[:, rows]) / w[:, rows].sum(0)[:, None]
    save_npz(folder / "val_predictions.npz", {"idx": rows.astype(np.int64), "y": y[rows],
                                              "probs": val_blend.astype(np.float32)})
    report = {
        "strategy": name, "tta": use_tta, "estimate": est,
        "weights": {m.name: float(wt) for m, wt in zip(members, weights) if wt},
        "members": [m.name for m in members], "skipped": skipped,
        "candidates": [{"strategy": n, "tta": r[0], **e} for r in results for n, _, e in r[4]],
        "note": "each row is scored only by blend members that held it out of training",
    }
    write_json(folder / "ensemble.json", report)
    runs.run_of(folder).write_probs(test)  # after ensemble.json: the probabilities name the blend they come from
    return report


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.ensemble", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="an ensemble run under runs/ (trained with members > 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--tta", action="store_true", help="also try test-time shifts; kept only if validation says so")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from pipeline.nn import select_device

    run = runs.Run.existing(args.run)
    if not run.is_ensemble:
        raise UserError(f"runs/{run.name} has no members/: train it with an ensemble preset "
                        f"(`make train PRESET=overnight RUN={run.name}`)")
    with run.lock("ensemble"):
        report = build(run.folder, select_device(args.device), tta=args.tta)
    folder = run.folder
    for c in report["candidates"]:
        print(f"  {c['strategy']:<18} tta={int(c['tta'])}  acc {c['accuracy']:.5f}  "
              f"log_loss {c['log_loss']:.4f}  on {c['rows']} held-out rows")
    est = report["estimate"]
    print(f"chosen: {report['strategy']}{' + TTA' if report['tta'] else ''} of "
          f"{json.dumps(report['weights'])}: validation {est['accuracy']:.5f} on {est['rows']} rows "
          f"-> runs/{folder.name}/test_probs.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
