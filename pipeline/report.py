"""Figures and tables of a trained run: runs/NAME/report/.

    python -m pipeline.report --run NAME

Reads only the run folder and data/processed/train.npz (validation images); never the test labels.
Writes curves.png, lr.png, confusion.png, worst.png, per_class.png, filters.png and, LAST (it is the
Makefile's target), report.md linking them with the headline figures.
"""
import math
import sys

import numpy as np

from pipeline import console, dataset, runs
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import atomic_path, write_text
from pipeline.score import confusion_matrix, per_class_scores

WORST_SHOWN = 36  # a 6 x 6 grid stays readable at 28 x 28 pixels each


# ---------------------------------------------------------------- inputs

def load_metrics(folder):
    """Epoch records of metrics.jsonl sorted by epoch; a resumed run's repeated epoch keeps its last record."""
    return runs.run_of(folder).metrics()


def load_val_predictions(folder):
    """(idx int64 (n,), y int64 (n,), probs float32 (n, 10)) of the delivered model on validation."""
    return runs.run_of(folder).val_predictions()


def first_conv_kernel(state):
    """The first conv layer's kernel (kh, kw, Cin, Cout) from a state dict: '0.w', else the first 4-D weight."""
    def kernel(key):
        w = state[key]
        return w.ndim == 4 and w.dtype.kind == "f" and w.size > 0  # (an empty or text one: a hand-made file)

    def layer_order(key):
        head = key.split(".", 1)[0]
        return (int(head), key) if head.isascii() and head.isdigit() else (math.inf, key)

    for key in (["0.w"] if "0.w" in state else []) + sorted(state, key=layer_order):
        if kernel(key):
            return state[key]
    raise UserError("model.npz has no 4-D convolution kernel of numbers: retrain the run")


# ---------------------------------------------------------------- figures

def _figure(figsize):
    """A figure of its own, outside pyplot: no backend is chosen or changed, and nothing is left open to show
    (a notebook keeps its inline plots for the cells that follow)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig, path):
    """Write a figure atomically as PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _series(metrics, key):
    """(epochs, values) of the records that carry `key` with a finite number (a diverged loss is left out: an
    infinite or huge value broke the axes)."""
    pairs = [(m["epoch"], console.finite(m.get(key))) for m in metrics]
    pairs = [p for p in pairs if p[1] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_curves(metrics, path):
    fig = _figure((11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            epochs, values = _series(metrics, f"{split}_{key}")
            if values:
                ax.plot(epochs, values, style, markersize=3, label="train" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")  # losses fall over orders of magnitude
    _, val_acc = _series(metrics, "val_acc")
    if val_acc:
        ax_acc.set_ylim(max(0.0, min(val_acc) - 0.02), 1.0)
    _save(fig, path)


def plot_learning_rate(metrics, path):
    fig = _figure((6, 3.5))
    ax = fig.subplots()
    epochs, lrs = _series(metrics, "lr")
    ax.plot(epochs, lrs, "-o", markersize=3)
    if lrs and min(lrs) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per epoch")
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_confusion(confusion, path):
    """Counts in every cell; colour shows only the errors (off the diagonal), which are what matter."""
    errors = confusion.astype(float)
    np.fill_diagonal(errors, 0)
    fig = _figure((6.5, 5.5))
    ax = fig.subplots()
    image = ax.imshow(errors, cmap="Reds", vmin=0, vmax=max(1.0, errors.max()))
    n = len(confusion)
    for t in range(n):
        for p in range(n):
            value = confusion[t, p]
            if value or t == p:
                ax.text(p, t, str(value), ha="center", va="center", fontsize=8,
                        fontweight="bold" if t == p else "normal",
                        color="white" if errors[t, p] > 0.6 * errors.max() else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Validation confusion ({int(np.trace(confusion))}/{int(confusion.sum())} correct)")
    fig.colorbar(image, ax=ax, label="misclassified images")
    _save(fig, path)


def worst_misclassified(y, probs, limit=WORST_SHOWN):
    """Positions of misclassified validation rows, lowest probability of the true class first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y)
    p_true = probs[wrong, y[wrong]]
    return wrong[np.argsort(p_true, kind="stable")][:limit]


def plot_worst(images, y, probs, positions, path):
    """Grid of images (n, 28, 28, 1) at `positions` titled 'true -> predicted (confidence)'."""
    if len(positions) == 0:
        fig = _figure((4, 1.5))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no misclassified validation images", ha="center", va="center")
        ax.axis("off")
        _save(fig, path)
        return
    cols = min(6, len(positions))
    rows = math.ceil(len(positions) / cols)
    fig = _figure((1.7 * cols, 1.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, pos in zip(axes.ravel(), positions):
        pred = int(probs[pos].argmax())
        ax.imshow(images[pos, :, :, 0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"{y[pos]} \u2192 {pred} ({probs[pos, pred]:.2f})", fontsize=9)
    fig.suptitle("Worst misclassified validation images: true \u2192 predicted (confidence)", fontsize=10, y=1.0)
    fig.tight_layout()
    _save(fig, path)


def plot_per_class(per_class, path):
    classes = [r["class"] for r in per_class]
    fig = _figure((8, 3.8))
    ax = fig.subplots()
    width = 0.27
    lowest = 1.0
    for shift, key in ((-width, "precision"), (0.0, "recall"), (width, "f1")):
        values = [r[key] for r in per_class]
        lowest = min(lowest, *values)
        ax.bar(np.array(classes) + shift, values, width, label=key if key != "f1" else "F1")
    ax.set_ylim(max(0.0, lowest - 0.02), 1.002)  # zoomed: the differences are a fraction of a percent
    ax.set_xticks(classes)
    ax.set_xlabel("class")
    ax.set_title("Validation precision, recall and F1 per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: inside it would hide bars
    _save(fig, path)


def plot_filters(kernel, path):
    """First-layer filters (kh, kw, Cin, Cout), averaged over input channels, each scaled to its own range."""
    filters = kernel.mean(axis=2)  # (kh, kw, Cout)
    count = filters.shape[-1]
    cols = min(8, count)
    rows = math.ceil(count / cols)
    fig = _figure((1.1 * cols, 1.2 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:count]):
        ax.imshow(filters[:, :, i], cmap="RdBu_r", vmin=-np.abs(filters[:, :, i]).max(),
                  vmax=np.abs(filters[:, :, i]).max())
        ax.set_title(str(i), fontsize=7)
    fig.suptitle(f"First conv layer: {count} filters {kernel.shape[0]}x{kernel.shape[1]} "
                 "(red +, blue -)", fontsize=10)
    _save(fig, path)


# ---------------------------------------------------------------- report.md

def format_duration(seconds):
    seconds = console.finite(seconds)  # NaN or a string in a hand-edited summary
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _percent(value):
    value = console.finite(value)
    return "unknown" if value is None else f"{100 * value:.2f}%"


def _number(value):
    value = console.finite(value)
    return "unknown" if value is None else f"{value:.4f}"


def per_class_markdown(per_class):
    lines = ["| class | precision | recall | F1 | support |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
              for r in per_class]
    return "\n".join(lines)


def report_markdown(name, summary, config, metrics, confusion, per_class, n_worst):
    last = metrics[-1]
    n_val = int(confusion.sum())
    errors = n_val - int(np.trace(confusion))
    if summary:
        delivered = f"{_percent(summary.get('best_val_acc'))}** " \
                    f"({'the weight average of ' if summary.get('weight_average') else ''}epoch " \
                    f"{summary.get('best_epoch', '?')}, " \
                    f"{'the last' if summary.get('select') == 'last' else 'the best by validation'}; " \
                    f"loss {_number(summary.get('best_val_loss'))})"
    else:  # no summary.json: training stopped (MAX_TIME) and a checkpoint was delivered so far
        delivered = f"{_percent((n_val - errors) / n_val if n_val else None)}** (the checkpoint delivered so far)"
    wall_time = format_duration(summary.get("wall_time_s")) if summary else \
        f"{format_duration(last.get('wall_time_s'))} (to the end of epoch {last.get('epoch', '?')})"
    lines = [
        f"# Run `{name}`",
        "",
        f"- architecture: `{summary.get('arch', config.arch)}`, optimizer `{config.optimizer}` "
        f"(lr {config.lr:g}, schedule `{config.schedule}`), batch {config.batch_size}, "
        f"augment {'on' if config.augment else 'off'}, seed {config.seed}"
        f"{f', on a bag of {config.bag:.0%} of the training rows' if config.bag < 1 else ''}",
        f"- **validation accuracy of the delivered model: {delivered}",
        f"- epochs: {summary.get('epochs_done', len(metrics))} of {config.epochs}"
        f"{'' if summary.get('finished', bool(summary)) else ' (unfinished)'}",
        f"- wall time: {wall_time}",
        f"- validation: {n_val} images, {errors} misclassified by the delivered model",
        f"- last epoch: train acc {_percent(last.get('train_acc'))}, val acc {_percent(last.get('val_acc'))}",
        "",
        "## Training curves",
        "",
        "![loss and accuracy](curves.png)",
        "",
        "![learning rate](lr.png)",
        "",
        "## Validation confusion matrix",
        "",
        "![confusion matrix](confusion.png)",
        "",
        "## Per-class scores (validation)",
        "",
        per_class_markdown(per_class),
        "",
        "![per-class scores](per_class.png)",
        "",
        f"## Worst misclassified validation images ({n_worst} shown)",
        "",
        "![worst misclassified](worst.png)",
        "",
        "## First convolution layer filters",
        "",
        "![first layer filters](filters.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(folder):
    """Write every figure of the run in `folder` into folder/report/, then report.md; returns its path."""
    run = runs.run_of(folder)
    if run.is_ensemble:  # its blend has no curves or filters of its own: each member has
        done, _ = run.finished_members()
        names = ", ".join(m.name.rsplit("/", 1)[-1] for m in done) or "none finished yet"
        raise UserError(f"runs/{run.name} is an ensemble: report one of its members, `make report "
                        f"RUN={run.name}/members/K` (K: {names}); `make ensemble RUN={run.name}` shows the blend")
    config = run.config()
    summary = run.summary()
    metrics = run.metrics()
    kernel = first_conv_kernel(run.model_state())
    idx, y, probs = run.val_predictions()
    images, labels = dataset.load_train()
    if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
        raise UserError(f"{folder / 'val_predictions.npz'} indexes rows beyond train.npz: rerun `make prepare` and retrain")
    trained_on = summary.get("train_sha256")  # runs from before it was recorded: their labels must still match
    if (trained_on and trained_on != dataset.load_meta().get("train_sha256")) or not np.array_equal(labels[idx], y):
        raise UserError(f"runs/{run.name} was trained on another train.csv than data/processed holds now, so its "
                        f"validation images cannot be drawn: prepare that train.csv again, or retrain the run")

    out = folder / "report"
    confusion = confusion_matrix(y, probs.argmax(axis=1))
    per_class = per_class_scores(confusion)
    worst = worst_misclassified(y, probs)
    plot_curves(metrics, out / "curves.png")
    plot_learning_rate(metrics, out / "lr.png")
    plot_confusion(confusion, out / "confusion.png")
    plot_worst(images[idx], y, probs, worst, out / "worst.png")
    plot_per_class(per_class, out / "per_class.png")
    plot_filters(kernel, out / "filters.png")
    report = out / "report.md"
    write_text(report, report_markdown(run.name, summary, config, metrics, confusion, per_class, len(worst)))
    return report


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name under runs/")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    run = runs.Run.existing(args.run)
    with run.lock("report", shared=True):
        path = write_report(run.folder)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
