"""Lab table for an ensemble run: how the blend grows with its members (k = 1..K), scored on the offline key.

    python -m bench.ensemble_curve --run night [--key data/raw/test_labels.csv]

For each k it blends the first k finished members exactly as `make ensemble` would (pipeline.ensemble:
choice on one half of the shared validation rows, estimate on the other), and prints beside it what the
hidden answer key says of each member alone, of the mean of the first k, and of the chosen blend. The key
is read here only to print those scores, after every choice is made: nothing it holds reaches a choice.
Below the table, an extrapolation (not a run): the error of the mean of k members fitted as a + b/k (least
squares over k = 1..K; the issue asks for K >= 5 before it is quoted), and what it gives at 5, 8, 10 and 15
members (4 hours on 2 cores are about 5 members of 45 epochs or 7-8 of 32; the preset's night is 9 of 45). Runs while the ensemble still trains (it reads finished members only; each member's test probabilities are
cached in its folder as `make ensemble` caches them).
"""
import argparse
import sys

import numpy as np

from pipeline import dataset, ensemble, paths, runs
from pipeline.errors import one_line_warnings
from pipeline.score import load_answer_key


def accuracy(probs, labels):
    return float((probs.argmax(1) == labels).mean())


def curve(run_name, key_path=None):
    folder = runs.Run.existing(run_name).folder
    members, skipped = ensemble.finished_members(folder)
    x_train, _ = dataset.load_train()
    x_test = dataset.load_test_images()
    labels, _ = load_answer_key(key_path or paths.data_raw() / "test_labels.csv")
    outs = [ensemble.member_outputs(m, x_train, x_test, np, tta=False) for m in members]
    summaries = [runs.load_summary(m) for m in members]
    rows = []
    for k in range(1, len(members) + 1):
        _, y, P = ensemble.shared_holdout([(idx, yy, vp) for idx, yy, vp, _ in outs[:k]])
        name, weights, picked, estimate, _ = ensemble.select_blend(P, y)
        tests = np.stack([o[3] for o in outs[:k]])
        rows.append({
            "k": k, "member": members[k - 1].name, "member_val": summaries[k - 1]["best_val_acc"],
            "member_hidden": accuracy(tests[-1], labels),
            "mean_hidden": accuracy(tests.mean(0), labels),
            "chosen": name, "estimate": estimate["accuracy"],
            "chosen_hidden": accuracy(np.tensordot(weights / weights.sum(), tests, axes=1), labels),
            "member_wall_s": summaries[k - 1].get("wall_time_s", float("nan")),
            "wall_h": sum(s.get("wall_time_s", float("nan")) for s in summaries[:k]) / 3600,
        })
    return rows, skipped


def extrapolate(rows, at=(5, 8, 10, 15)):
    """Fit err(k) = a + b/k to the hidden error of the mean of the first k members, k = 1..K (least squares).
    Returns (a, b, {k: accuracy the fit gives at k}); an extrapolation, not a measurement."""
    k = np.array([r["k"] for r in rows], float)
    err = 1.0 - np.array([r["mean_hidden"] for r in rows])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(k), 1.0 / k], 1), err, rcond=None)
    return float(a), float(b), {n: 1.0 - (a + b / n) for n in at}


@one_line_warnings()
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ensemble_curve", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--key", default=None)
    args = p.parse_args(argv)
    from pipeline.nn import configure_threads
    configure_threads()  # member predictions as `make ensemble` makes them
    rows, skipped = curve(args.run, args.key)
    print("| k | member | member val | member hidden | mean of k hidden | chosen | estimate | chosen hidden "
          "| member wall | total wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['member']} | {r['member_val']:.4%} | {r['member_hidden']:.3%} | "
              f"{r['mean_hidden']:.3%} | {r['chosen']} | {r['estimate']:.3%} | {r['chosen_hidden']:.3%} | "
              f"{r['member_wall_s'] / 60:.0f} min | {r['wall_h']:.2f} h |")
    if len(rows) >= 2:
        a, b, acc = extrapolate(rows)
        caveat = "" if len(rows) >= 5 else f" (only {len(rows)} members: too few to quote)"
        print(f"extrapolation, not a run{caveat}: error of the mean of k = {a:.3%} + {b:.3%}/k over k = 1..{len(rows)}; "
              + ", ".join(f"{n} members {v:.3%}" for n, v in acc.items()))
    if skipped:
        print(f"unfinished members left out: {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
