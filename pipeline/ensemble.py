"""Blend the finished members of an ensemble run, chosen by validation.

    python -m pipeline.ensemble --run NAME [--device auto|cpu|gpu] [--tta]

Every member holds out the same validation rows (the prepared split), so every candidate blend is judged
like for like, on rows none of its members trained on. The blend is the mean of all members (Deotte's
recipe) unless another candidate (the single best member, the mean of the top k, greedy forward selection
with replacement after Caruana et al. 2004) beats it on one fixed half of those rows by more than chance
allows (an exact one-sided McNemar test on the rows where the two disagree, Bonferroni over the candidates):
with a few errors in two thousand rows, one or two rows of difference is noise, and a choice made on noise
is a lucky pick that the hidden rows do not repeat. The same test decides test-time shifts. The chosen
blend's accuracy on the other half is the estimate, which no choice has seen.
runs/NAME/ gets ensemble.json (the blend, its estimate, every candidate), test_probs.npz (for `submit`)
and val_predictions.npz.

A member's test probabilities are cached in its folder with what they were made from (pipeline.runs):
the cache is used only when the test data and the member's model are the ones of now.
"""
import functools
import hashlib
import json
import math
import sys
import warnings
from typing import NamedTuple

import numpy as np

from pipeline import dataset, runs
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import atomic_paths, json_text, save_npz

TEST_CACHE = {False: "test_probs.npz", True: "test_probs_tta.npz"}

TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dy, dx) in pixels
MIN_SHARED_ROWS = 20  # fewer validation rows in common than this cannot rank blends
ALPHA = 0.05  # the chance, at most, that noise on the choice half displaces the mean of all members


def finished_members(folder):
    """Member folders whose training finished; the others are skipped with a warning."""
    done, skipped = runs.run_of(folder).finished_members()
    done = [m.folder for m in done]
    if skipped:
        warnings.warn(f"runs/{folder.name}: skipping unfinished members {', '.join(skipped)}", stacklevel=2)
    if not done:
        raise UserError(f"runs/{folder.name}: no member has finished training yet")
    return done, skipped


def trained_on(members):
    """{train.csv sha256: [member names]} from the members' summaries; members from before it was recorded are
    left out (shared_holdout checks them by their labels)."""
    found = {}
    for m in members:
        sha = runs.run_of(m).summary().get("train_sha256")
        if isinstance(sha, str):  # (anything else is a hand edit: as if none were recorded)
            found.setdefault(sha, []).append(m.name)
    return found


def check_one_train_csv(folder, members):
    """Every member was trained on the same train.csv. A blend of members trained on different ones would be
    judged on one member's labels, and the others would look like noise."""
    found = trained_on(members)
    if len(found) > 1:
        prepared = dataset.load_meta().get("train_sha256")
        other = sorted((name for sha, names in found.items() if sha != prepared for name in names), key=int)
        groups = "; ".join(f"members {', '.join(sorted(names, key=int))} on {sha[:12]}" for sha, names in found.items())
        if len(other) < sum(map(len, found.values())):  # some learnt the prepared one: retrain the others on it
            advice = (f"remove {', '.join(f'runs/{folder.name}/members/{k}' for k in other)} (learnt on another "
                      f"train.csv than the prepared one), and `make train RUN={folder.name}` trains them again on it")
        else:
            advice = (f"prepare the train.csv some of them learnt, remove the others, and `make train "
                      f"RUN={folder.name}` trains those again")
        raise UserError(f"runs/{folder.name}: members were trained on different train.csv files ({groups}): {advice}; "
                        f"or train an ensemble under a new RUN=")


def check_shifts_judged_on_their_images(folder, members, rows, y, y_train):
    """Test-time shifts are judged on the prepared images of the shared validation rows: they must be the images
    the members held out (the same train.csv, by sha where recorded, else by the labels)."""
    prepared = dataset.load_meta().get("train_sha256")
    if any(sha != prepared for sha in trained_on(members)) or not np.array_equal(y_train[rows], y):
        raise UserError(f"runs/{folder.name}'s members were trained on another train.csv than the prepared one: "
                        f"test-time shifts would be judged on other images than their labels; blend without "
                        f"TTA, or prepare the train.csv they were trained on again")


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


def member_outputs(member, x_train, x_test, xp, tta, data=None):
    """(val_idx, val_y, val_probs, test_probs) of one member; test probabilities are cached in its folder, marked
    with `data`, the data fingerprint taken before x_test was read."""
    run = runs.run_of(member)
    made_from = run.made_from(data)
    idx, y, val_probs = run.val_predictions()
    if len(idx) and (idx.min() < 0 or idx.max() >= len(x_train)):
        raise UserError(f"{member / 'val_predictions.npz'} indexes rows beyond train.npz (the data changed since "
                        f"it was trained): retrain runs/{run.root.name} on this data, or prepare the old data again")
    test = run.cached_probs(TEST_CACHE[tta], len(x_test), made_from)
    if test is None:  # missing, damaged, or made from other data or another model: recompute
        test = tta_probs(member, x_test, xp) if tta else predict_probs(member, x_test, xp)
        run.write_probs(test, TEST_CACHE[tta], made_from)
    if tta:
        val_probs = tta_probs(member, x_train[idx], xp)
    return idx, y, val_probs, test


def shared_holdout(outputs, min_rows=MIN_SHARED_ROWS):
    """The rows of train.csv that every member held out, and the members' probabilities on them.

    outputs: [(idx, labels, probs)] per member. Returns rows int64 (n,), y int64 (n,) and P float32
    (K, n, 10). Every candidate blend is then judged on the same rows, by all of its members.
    """
    rows = functools.reduce(np.intersect1d, [idx for idx, _, _ in outputs])
    if len(rows) < min_rows and all(len(idx) == len(rows) for idx, _, _ in outputs):  # one split, too small
        raise UserError(f"the members' validation split holds only {len(rows)} rows, and choosing a blend needs "
                        f"at least {min_rows}: prepare a larger VAL_FRACTION (`make train VAL_FRACTION=0.1 "
                        f"RUN=NEW` splits and trains)")
    if len(rows) < min_rows:
        raise UserError(f"the members share only {len(rows)} validation rows: they were trained on different "
                        f"splits (an ensemble from before members shared the prepared split); train it again "
                        f"under a new RUN=")
    P, y = [], None
    for idx, labels, probs in outputs:
        pos = np.searchsorted(idx, rows, sorter=np.argsort(idx, kind="stable"))
        order = np.argsort(idx, kind="stable")[pos]
        P.append(probs[order])
        if y is not None and not np.array_equal(labels[order], y):  # members from before summaries named train.csv
            raise UserError(f"the members disagree on the labels of the validation rows they share: they were trained "
                            f"on different train.csv files; train an ensemble on one under a new RUN=")
        y = labels[order] if y is None else y
    return rows.astype(np.int64), np.asarray(y, np.int64), np.stack(P).astype(np.float32)


def split_halves(n):
    """(choose, estimate): two disjoint halves of range(n), fixed for a given n. Blends are chosen on the
    first; the second gives an estimate that no choice has seen."""
    perm = np.random.default_rng(0x5E1EC7).permutation(n)
    return np.sort(perm[:n // 2]), np.sort(perm[n // 2:])


def blend_score(weights, P, y):
    """Accuracy and log loss of the weighted mean of the members' probabilities P (K, n, 10) on labels y."""
    w = np.asarray(weights, np.float64)
    if len(y) == 0 or w.sum() <= 0:
        return {"accuracy": 0.0, "log_loss": float("inf"), "rows": 0}
    blend = np.tensordot(w / w.sum(), P, axes=1)
    p_true = np.clip(blend[np.arange(len(y)), y], 1e-12, 1.0)
    return {"accuracy": float((blend.argmax(1) == y).mean()), "log_loss": float(-np.log(p_true).mean()),
            "rows": int(len(y))}


def _key(est):
    return est["accuracy"], -est["log_loss"]


def candidates(P, y, rounds=None):
    """Every candidate blend judged on (P, y): [(name, weights, score)], best single member first and the
    mean of all members (the reference the others must beat) last but one, before greedy selection."""
    k = len(P)
    singles = [blend_score(np.eye(k)[i], P, y) for i in range(k)]
    order = sorted(range(k), key=lambda i: _key(singles[i]), reverse=True)
    out = [("best single", np.eye(k)[order[0]], singles[order[0]])]
    for top in range(2, k + 1):
        w = np.zeros(k)
        w[order[:top]] = 1.0
        out.append(("mean of all" if top == k else f"mean of top {top}", w, blend_score(w, P, y)))
    if k > 1:
        w, best = greedy_selection(P, y, order[0], rounds or 2 * k)
        out.append(("greedy selection", w, best))
    return out


def correct_rows(weights, P, y):
    """Which rows of y the weighted mean of P (K, n, 10) gets right: bool (n,)."""
    w = np.asarray(weights, np.float64)
    return np.tensordot(w / w.sum(), P, axes=1).argmax(1) == y


def mcnemar_p(right, reference_right):
    """One-sided exact McNemar test: the chance that a blend no better than the reference wins at least as
    many of the rows where the two disagree (bool arrays, one entry per row)."""
    wins = int(np.sum(right & ~reference_right))
    n = wins + int(np.sum(~right & reference_right))
    return sum(math.comb(n, j) for j in range(wins, n + 1)) / 2 ** n  # exact integers: no float overflow


def greedy_selection(P, y, start, rounds):
    """Caruana's forward selection with replacement, from the best member, while the score improves."""
    w = np.zeros(len(P))
    w[start] = 1.0
    best = blend_score(w, P, y)
    for _ in range(rounds):
        score, i = max((_key(blend_score(w + np.eye(len(P))[i], P, y)), i) for i in range(len(P)))
        if score <= _key(best):
            break
        w[i] += 1.0
        best = blend_score(w, P, y)
    return w, best


def choose(P, y):
    """The mean of all members, unless a candidate beats it on (P, y) by more than chance allows: then the
    candidate that beats it most surely. Returns the choice and every candidate, each score with its `p`
    against the mean of all."""
    cands = candidates(P, y)
    ref = next(i for i, c in enumerate(cands) if c[0] == "mean of all") if len(P) > 1 else 0
    ref_right = correct_rows(cands[ref][1], P, y)
    for name, w, score in cands:
        score["p"] = 1.0 if w is cands[ref][1] else mcnemar_p(correct_rows(w, P, y), ref_right)
    alpha = ALPHA / max(1, len(cands) - 1)
    better = [i for i, c in enumerate(cands) if c[2]["p"] < alpha and _key(c[2]) > _key(cands[ref][2])]
    best = min(better, key=lambda i: (cands[i][2]["p"], i)) if better else ref
    return cands[best], cands


def select_blend(P, y):
    """(name, weights, choice_score, estimate, candidates): the blend chosen on one half of the rows, and its
    score on the other half, which took no part in the choice."""
    pick, rest = split_halves(len(y))
    (name, weights, picked), cands = choose(P[:, pick], y[pick])
    return name, weights, picked, blend_score(weights, P[:, rest], y[rest]), cands


class BlendPass(NamedTuple):
    """One pass of build over the members' outputs, with or without test-time shifts: the blend chosen on it."""
    tta: bool
    strategy: str
    weights: np.ndarray
    choice_score: dict      # the blend on the choice half of the shared rows
    estimate: dict          # ... on the other half, which took no part in the choice
    candidates: list        # (strategy, weights, score) for every blend compared
    outs: list              # per member: (validation rows, labels, validation probs, test probs)
    rows: np.ndarray        # the validation rows every member held out
    y: np.ndarray           # their labels
    P: np.ndarray           # (members, rows, 10): each member's probabilities on them


def build(folder, xp=np, tta=False):
    """Select the blend of runs/NAME's members and write ensemble.json, test_probs.npz, val_predictions.npz.

    Candidates are compared on one half of the validation rows every member held out; the other half gives
    the reported estimate, which took no part in the choice."""
    members, skipped = finished_members(folder)
    check_one_train_csv(folder, members)
    data = runs.data_fingerprint()  # before the images are read: prepare is not locked out meanwhile
    x_train, y_train = dataset.load_train()
    x_test = dataset.load_test_images()
    passes = []  # one BlendPass without test-time shifts, then (tta) one with them
    for use_tta in ([False, True] if tta else [False]):
        if use_tta:  # before the shifted passes, which take the longest
            check_shifts_judged_on_their_images(folder, members, passes[0].rows, passes[0].y, y_train)
        outs = [member_outputs(m, x_train, x_test, xp, use_tta, data) for m in members]
        rows, y, P = shared_holdout([(idx, yy, vp) for idx, yy, vp, _ in outs])
        passes.append(BlendPass(use_tta, *select_blend(P, y), outs, rows, y, P))
    chosen = passes[0]
    if tta:  # test-time shifts too must beat the plain blend on the choice half by more than chance allows
        pick, _ = split_halves(len(passes[0].y))
        plain, shifted = passes
        p = mcnemar_p(correct_rows(shifted.weights, shifted.P[:, pick], shifted.y[pick]),
                      correct_rows(plain.weights, plain.P[:, pick], plain.y[pick]))
        shifted.choice_score["p_vs_plain"] = p
        if p < ALPHA and _key(shifted.choice_score) > _key(plain.choice_score):
            chosen = shifted
    use_tta, name, weights, picked, estimate, cands, outs, rows, y, P = chosen

    test = np.tensordot(weights / weights.sum(), np.stack([o[3] for o in outs]), axes=1).astype(np.float32)
    val_blend = np.tensordot(weights / weights.sum(), P, axes=1)
    report = {
        "strategy": name, "tta": use_tta, "estimate": estimate,
        "choice_score": picked, "all_rows": blend_score(weights, P, y),
        "weights": {m.name: float(wt) for m, wt in zip(members, weights) if wt},
        "members": [m.name for m in members], "skipped": skipped,
        "candidates": [{"strategy": n, "tta": r.tta, **e} for r in passes for n, _, e in r.candidates],
        "note": "candidates are compared on one half of the validation rows every member held out (choice_score); "
                "the mean of all members is kept unless a candidate beats it there with p < "
                f"{ALPHA} over the candidates (exact one-sided McNemar, `p`); estimate is the chosen blend on the "
                "other half, which took no part in any choice",
    }
    text = json_text(report)
    run = runs.run_of(folder)
    made_from = {**run.made_from(data), "blend": hashlib.sha256(text.encode()).hexdigest()}  # the blend they are
    # all three on disk before any is moved in: a kill between separate writes left one blend's files beside another's
    with atomic_paths([folder / "val_predictions.npz", folder / "ensemble.json", folder / runs.TEST_PROBS]) as temps:
        save_npz(temps[0], {"idx": rows, "y": y, "probs": val_blend.astype(np.float32)})
        temps[1].write_text(text)
        run.write_probs(test, made_from=made_from, to=temps[2])
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
    from pipeline.nn import configure_threads, select_device

    configure_threads()  # as training ran: the engine's threads, NumPy's BLAS held to one

    run = runs.Run.existing(args.run)
    if run.is_member:  # blended by its ensemble
        raise UserError(f"runs/{run.name} is a member: blend its ensemble, `make ensemble RUN={run.parent.name}`")
    if not run.is_ensemble:
        raise UserError(f"runs/{run.name} has no members/: train it with an ensemble preset "
                        f"(`make train PRESET=overnight RUN={run.name}`)")
    with run.lock("ensemble"):
        report = build(run.folder, select_device(args.device), tta=args.tta)
    folder = run.folder
    for c in report["candidates"]:
        print(f"  {c['strategy']:<18} tta={int(c['tta'])}  acc {c['accuracy']:.5f}  "
              f"log_loss {c['log_loss']:.4f}  p {c['p']:.2g}  on {c['rows']} rows (choice half)")
    est = report["estimate"]
    print(f"chosen: {report['strategy']}{' + TTA' if report['tta'] else ''} of "
          f"{json.dumps(report['weights'])}: estimate {est['accuracy']:.5f} on the {est['rows']} validation rows "
          f"that took no part in the choice -> runs/{folder.name}/test_probs.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
