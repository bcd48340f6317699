"""The kernel's runtime on Kaggle: its settings, where the competition data is, where outputs go, how stages run.

The notebook (built by `make kernel` from kernels/digit-recognizer/) calls these; nothing runs at import.
KAGGLE_ROOT (default /kaggle) relocates input/ and working/, so tests run the notebook on a fake tree.

    /kaggle/input/...              read-only: the competition (and maybe an earlier version's output)
    /kaggle/working/pipeline/      PIPELINE_ROOT: data/processed, runs/RUN (checkpoints), submissions
    /kaggle/working/submission.csv what the competition scores
    /kaggle/working/.session-started when this session began (its training budget counts from there)
"""
import html
import json
import math
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import one_line_warnings

COMPETITION = "digit-recognizer"
COMPETITION_FILES = ("train.csv", "test.csv")
DEVICES = ("auto", "cpu", "gpu")
SEARCH_DEPTH = 4  # how far below input/ to look for the CSVs or an earlier run (datasets can be deep trees)


def kaggle_root() -> Path:
    return Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))


def input_dir() -> Path:
    return kaggle_root() / "input"


def working_dir() -> Path:
    return kaggle_root() / "working"


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """The notebook's settings cell, checked (see settings())."""
    preset: str                # a preset of configs/
    epochs: Optional[int]      # None: the preset's own
    max_time: str              # this session's training budget (e.g. 10h, 90m)
    device: str                # auto | cpu | gpu, as asked; training_device() says which one runs
    seed: int                  # weights, data order and augmentation

    @property
    def run(self) -> str:
        """The run's name under runs/: one per preset, epochs and seed, so a changed cell trains a run of its own
        (a changed MAX_TIME or DEVICE continues the same one)."""
        name = f"kaggle-{self.preset}"
        if self.epochs is not None:
            name += f"-{self.epochs}ep"
        if self.seed:
            name += f"-seed{self.seed}"
        return name

    def train_args(self, device):
        """train's argv for these settings on `device` ('cpu' or 'gpu', from training_device()). MAX_TIME is
        what is left of the session's training time when that is less (the Train cell run again)."""
        args = ["--preset", self.preset, "--run", self.run, f"MAX_TIME={session_budget(self.max_time)}",
                f"SEED={self.seed}", f"DEVICE={device}"]
        return args + ([f"EPOCHS={self.epochs}"] if self.epochs is not None else [])


# Kaggle ends a CPU or GPU session after 12 hours: training stops an hour before, so the submission is written.
MAX_TRAINING_S = 11 * 3600
# When the session began (time.time()), written by its first Setup into working/, which a Run All again, or a
# restarted kernel, keeps (the bundle cell imports every module anew). MAX_TIME counts from each Train cell's
# start, so the Train cell run again late in a session would train past Kaggle's 12 hours. A record older than
# a session (working/ kept by Kaggle's persistence setting) is an earlier session's: the clock starts again.
SESSION_RECORD = ".session-started"
SESSION_S = 12 * 3600
_started_here = []  # the clock of this process, where working/ cannot hold the record


def session_started():
    """When this session began: its record in working/, written now when there is none, or one that cannot be
    this session's (damaged, in the future, or older than a session)."""
    from pipeline.fileio import write_text

    path = working_dir() / SESSION_RECORD
    now = time.time()
    try:
        started = float(path.read_text())
        if math.isfinite(started) and now - SESSION_S <= started <= now:
            return started
    except (OSError, ValueError):
        pass
    try:
        write_text(path, f"{now}\n")
    except OSError:  # working/ not writable: this process's own clock, from its first question
        _started_here[:] = _started_here or [now]
        return _started_here[0]
    return now


def session_budget(max_time):
    """MAX_TIME, or what is left of MAX_TRAINING_S since the session began when that is less (then in seconds,
    with a line saying so). At least a second: training then stops at once and delivers what it has."""
    from pipeline.report import format_duration
    from pipeline.train import parse_duration

    elapsed = time.time() - session_started()
    left = MAX_TRAINING_S - elapsed
    if parse_duration(max_time) <= left:
        return max_time
    print(f"MAX_TIME: {format_duration(max(left, 0))} left of this session's {MAX_TRAINING_S // 3600}h of training "
          f"(it began {format_duration(elapsed)} ago), so training stops then")
    return f"{max(int(left), 1)}s"


def settings(preset, epochs, max_time, device, seed) -> Settings:
    """The settings cell's values, checked: a typing mistake is one UserError here, before any data is read."""
    from pipeline import runs
    from pipeline.config import preset_path
    from pipeline.errors import UserError
    from pipeline.train import parse_duration

    def whole(name, value, low, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name} = {value!r}: expected a whole number of at least {low}"
                            + (" (or None)" if allow_none else ""))
        return value

    if not isinstance(preset, str):
        raise UserError(f"PRESET = {preset!r}: expected the name of a preset in quotes, e.g. 'quick'")
    preset_path(preset)  # UserError naming the known presets
    if not isinstance(max_time, str) or parse_duration(max_time) <= 0:
        raise UserError(f"MAX_TIME = {max_time!r}: expected a duration in quotes, e.g. '10h', '90m' or '1h30m'")
    if parse_duration(max_time) > MAX_TRAINING_S:  # counted from training's start; the stages after need time too
        raise UserError(f"MAX_TIME = {max_time!r}: Kaggle ends a session at 12h, and setup, the blend, predict and "
                        f"submit need their share: at most '{MAX_TRAINING_S // 3600}h'")
    if device not in DEVICES:
        raise UserError(f"DEVICE = {device!r}: expected one of {', '.join(repr(d) for d in DEVICES)}")
    checked = Settings(preset=preset, epochs=whole("EPOCHS", epochs, 1, allow_none=True), max_time=max_time,
                       device=device, seed=whole("SEED", seed, 0))
    if not runs.RUN_NAME.fullmatch(checked.run):  # train would refuse it, after the push, the queue and setup
        raise UserError(f"PRESET = {preset!r}, EPOCHS = {epochs!r}, SEED = {seed!r}: the run's name they make "
                        f"({len(checked.run)} characters) is longer than a run's name may be: use smaller numbers "
                        f"(or a preset of a shorter name)")
    return checked


def training_device(asked):
    """'gpu' when CuPy works on a GPU here, else 'cpu'; `asked` is the DEVICE setting (auto, cpu or gpu).

    A CuPy that imports but fails on its first real operation (a driver or architecture mismatch) would stop
    the session at the first training step: the engine's probe tries it once (pipeline.nn.backend), and with
    'auto' the notebook then trains with NumPy after the probe's one line. 'gpu' insists: a UserError.
    """
    from pipeline.errors import UserError
    from pipeline.nn import backend

    if asked == "cpu":
        return "cpu"
    if backend.cupy_available():
        return "gpu"
    if asked == "gpu":
        raise UserError(f"DEVICE = 'gpu' but {backend.cupy_unavailable_reason()}; set DEVICE = 'auto' (or 'cpu') "
                        f"in the settings cell, or choose a GPU accelerator for the notebook")
    return "cpu"


def _folders(root, depth):
    """Every folder below root down to `depth` levels, breadth first, sorted within a level (deterministic)."""
    level = [Path(root)]
    for _ in range(depth):
        level = sorted(child for folder in level for child in _subfolders(folder))
        yield from level


def _subfolders(folder):
    try:
        return [p for p in folder.iterdir() if p.is_dir()]
    except OSError:  # unreadable mount: skip it
        return []


def _has_competition(folder):
    return all((folder / name).is_file() for name in COMPETITION_FILES)


def find_competition_data(input_root=None) -> Path:
    """The folder holding train.csv and test.csv.

    Looks at input/digit-recognizer (the classic mount), input/competitions/digit-recognizer (the newer
    one), then searches input/ SEARCH_DEPTH levels down. UserError naming what is there when none fits.
    """
    from pipeline.errors import UserError

    root = Path(input_root) if input_root is not None else input_dir()
    for folder in (root / COMPETITION, root / "competitions" / COMPETITION):
        if _has_competition(folder):
            return folder
    for folder in _folders(root, SEARCH_DEPTH):
        if _has_competition(folder):
            return folder
    seen = ", ".join(p.name for p in sorted(_subfolders(root))) or "nothing"
    raise UserError(f"no folder with {' and '.join(COMPETITION_FILES)} under {root} (it holds: {seen}): add the "
                    f"'{COMPETITION}' competition as an input of the notebook")


def use_working_dir() -> Path:
    """Point PIPELINE_ROOT at working/pipeline, where every stage writes (data/processed, runs/, submissions/)."""
    root = working_dir() / "pipeline"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["PIPELINE_ROOT"] = str(root)
    session_started()  # the session's clock starts with its first Setup
    stale = working_dir() / "submission.csv"
    if stale.is_file():  # an earlier Run All's: a cell failing this time would leave it there, as if this run's
        stale.unlink()
        print(f"removed {stale} of an earlier run; this run writes its own")
    return root


def restore_earlier_run(run, input_root=None, train_argv=None):
    """Copy runs/RUN from an earlier version's output attached as input, unless this session has it already.

    Kaggle starts every version with an empty working/; attaching the notebook's own earlier output as an
    input lets training continue from its checkpoints. With `train_argv` (Settings.train_args), a run that
    train would refuse to continue with them (its preset changed since, in a newer build of the kernel) is
    not restored: this version trains it afresh, and says so. Returns the folder copied from, or None.
    """
    from pipeline import paths, train
    from pipeline.errors import UserError

    target = paths.runs() / run
    if (target / "config.toml").is_file() or (target / "checkpoints").is_dir() or (target / "summary.json").is_file():
        return None  # this session's own (an ensemble has config.toml and members/ long before a summary)
    root = Path(input_root) if input_root is not None else input_dir()
    for folder in _folders(root, SEARCH_DEPTH + 3):  # <input>/<slug>/pipeline/runs/<run>
        if folder.name == run and folder.parent.name == "runs" and (folder / "config.toml").is_file():
            shutil.copytree(folder, target, dirs_exist_ok=True)
            if train_argv is not None:
                try:
                    train.resolve_config(train.parse_args([str(a) for a in train_argv]), target)
                except UserError as exc:
                    shutil.rmtree(target)
                    print(f"not continuing {folder}: {str(exc).split(';')[0]}. This version trains runs/{run} "
                          f"afresh")
                    return None
            return folder
    return None


def prepare_if_tidied(data_dir):
    """Prepare the data again when Tidy up removed it: the Train cell run again after a Run All. Returns the
    stage's exit code, or None when the arrays are there."""
    from pipeline import paths, prepare

    if prepare.arrays_present(paths.data_processed()):
        return None
    return run_stage(prepare.main, ["--raw", data_dir, "--if-needed"])


class StageFailed(RuntimeError):
    """A stage's main() returned an error code; its one-line reason was printed just above."""


def run_stage(main, argv, ok=(0,)):
    """Call a stage's main(argv) as the command line would; raise StageFailed on an exit code outside `ok`."""
    argv = [str(a) for a in argv]
    print(f"$ python -m {main.__module__} {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code not in ok:
        raise StageFailed(f"{main.__module__} failed with exit code {code}: see the error line above")
    return code


@one_line_warnings()  # called from the notebook, not through a stage's cli_main
def deliver_best_so_far(folder, device=None):
    """After training stopped at its time budget: model.npz and val_predictions.npz from the best checkpoint.

    The newest checkpoint stands in when no epoch has ended yet. summary.json is not written, so the run
    stays unfinished and the next `train` continues it. An ensemble with a finished member is left alone (its
    finished members are blended); one stopped before any member finished delivers the member in training
    (members train one after another), so that a submission is still written. `device`: where to evaluate
    (default: the run's own). Returns model.npz's path, or None when there was nothing to deliver.
    """
    import numpy as np

    from pipeline import checkpoint, runs, train
    from pipeline.errors import UserError
    from pipeline.fileio import save_npz
    from pipeline.nn import build_model, configure_threads, select_device, to_numpy

    folder = Path(folder)
    ckpt_dir = folder / "checkpoints"
    run = runs.run_of(folder)
    if run.is_ensemble:
        started = [m for m in run.members() if (m.folder / "checkpoints").is_dir()]
        if run.finished_members()[0] or not started:
            return None
        return deliver_best_so_far(started[0].folder, device)
    if not ckpt_dir.is_dir():
        return None
    newest = checkpoint.load_newest(ckpt_dir)
    if newest is None and not (ckpt_dir / checkpoint.BEST).is_file():
        return None
    cfg = runs.load_config(folder)
    xp = select_device(device or cfg.device)
    configure_threads()  # as training ran: its evaluation is repeated here
    model = build_model(cfg.arch, seed=cfg.seed, dtype=np.float32, xp=xp)
    def newest_weights():
        if newest is None:
            raise UserError(f"{ckpt_dir} holds no readable checkpoint: run the Train cell again")
        return checkpoint.unpack(newest)[0]

    # what finish() would deliver: best.npz, or (damaged, foreign, or no epoch ended yet) the newest weights
    epoch = train.load_delivered(model, ckpt_dir, cfg, newest_weights)
    _, _, x_val, y_val, val_idx = train.load_data(cfg, xp)
    _, val_acc, probs = train.evaluate(model, x_val, y_val)
    save_npz(folder / "val_predictions.npz", {"idx": val_idx, "y": to_numpy(y_val), "probs": probs.astype(np.float32)})
    save_npz(folder / "model.npz", model.state_dict())
    print(f"{folder.name}: delivering the {f'epoch {epoch}' if epoch else 'newest'} checkpoint so far "
          f"(validation accuracy {val_acc:.4f}); running the Train cell again, or a later version with this "
          f"one's output attached, continues the training")
    return folder / "model.npz"


def submission_run(folder):
    """The run to predict and submit: the run itself, or for an ensemble stopped before any member finished,
    the member delivered so far (deliver_best_so_far)."""
    from pipeline import runs

    run = runs.run_of(folder)
    if not run.is_ensemble or run.finished_members()[0]:
        return run
    delivered = [m for m in run.members() if (m.folder / "model.npz").is_file()]
    if not delivered:
        raise StageFailed(f"runs/{run.name}: no member has finished or delivered a checkpoint, so there is nothing "
                          f"to submit: run the Train cell again (or give it a longer MAX_TIME)")
    return delivered[0]


def select(folder, device=None):
    """Say which model the submission comes from; for an ensemble run, choose its blend first (on `device`,
    default auto). Returns the line."""
    from pipeline import ensemble, runs

    run = runs.run_of(folder)
    source = submission_run(folder)
    if source.name != run.name:  # no member has finished: the one in training, delivered so far
        line = f"{source.name}'s checkpoint delivered so far (no member has finished yet; training continues " \
               f"when the Train cell runs again)"
    elif run.is_ensemble:  # blend the finished members by held-out validation
        run_stage(ensemble.main, ["--run", run.name, *(["--device", device] if device else [])])
        chosen = run.ensemble_report()
        line = f"{chosen['strategy']} of {len(chosen['weights'])} members, validation estimate " \
               f"{chosen['estimate']['accuracy']:.4f}"
    elif run.finished:
        summary = run.summary()
        how = "the last" if summary.get("select") == "last" else "the best by validation accuracy"
        what = "the weight average" if summary.get("weight_average") else "the weights"
        line = f"{what} of epoch {summary.get('best_epoch')} of {summary.get('epochs_done')}, {how} " \
               f"(validation accuracy {summary.get('best_val_acc', 0.0):.4f})"
    else:
        line = "the checkpoint delivered so far (training continues when the Train cell runs again)"
    print(f"{run.name}: {line}")
    return line


def report_folder(folder):
    """The run whose curves to show: the run itself, or for an ensemble its best finished member (the member
    delivered so far when none has finished). None, with a line saying so, when no epoch has ended yet."""
    from pipeline import runs

    folder = Path(folder)
    run = runs.run_of(folder)
    done = run.finished_members()[0] if run.is_ensemble else []
    chosen = max(done, key=lambda m: m.summary().get("best_val_acc") or 0.0) if done else submission_run(folder)
    if not (chosen.folder / "metrics.jsonl").is_file():
        print(f"runs/{chosen.name}: no epoch has ended yet, so there are no curves to report; the submission "
              f"comes from its newest checkpoint")
        return None
    return chosen.folder


# ---------------------------------------------------------------- the report, inline

def show_report(report_md):
    """Show a run's report.md in the notebook: its text as Markdown, its tables as HTML, every figure inline."""
    from IPython.display import HTML, Image, Markdown, display

    report_md = Path(report_md)
    for kind, lines in report_blocks(report_md.read_text(encoding="utf-8")):
        if kind == "figure":
            display(Image(filename=str(report_md.parent / lines[0])))
        elif kind == "table":
            display(HTML(markdown_table_html(lines)))
        elif "".join(lines).strip():
            display(Markdown("\n".join(lines).strip()))


def report_blocks(text):
    """[(kind, lines)] of a Markdown report in order: 'figure' (its file name), 'table' (pipe rows) or 'text'."""
    blocks = []
    for line in text.splitlines():
        figure = re.fullmatch(r"!\[[^\]]*\]\(([^)\s]+)\)", line.strip())
        kind = "figure" if figure else "table" if line.startswith("|") else "text"
        if figure:
            blocks.append(("figure", [figure.group(1)]))
        elif blocks and blocks[-1][0] == kind:
            blocks[-1][1].append(line)
        else:
            blocks.append((kind, [line]))
    return blocks


def markdown_table_html(lines):
    """An HTML table of a Markdown pipe table (header row, alignment row, body rows)."""
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header, aligns, body = cells(lines[0]), cells(lines[1]), [cells(line) for line in lines[2:]]
    styles = [' style="text-align: right"' if a.endswith(":") and not a.startswith(":") else "" for a in aligns]

    def row(values, tag):
        return "<tr>" + "".join(f"<{tag}{style}>{html.escape(v)}</{tag}>" for v, style in zip(values, styles)) + "</tr>"

    return ("<table>\n<thead>" + row(header, "th") + "</thead>\n<tbody>\n"
            + "\n".join(row(r, "td") for r in body) + "\n</tbody>\n</table>")
