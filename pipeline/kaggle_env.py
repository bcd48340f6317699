"""The kernel's runtime on Kaggle: where the competition data is, where outputs go, how stages run.

The generated notebook (kernels/digit-recognizer/, written by `make kernel`) calls these; nothing runs at
import. KAGGLE_ROOT (default /kaggle) relocates input/ and working/, so tests run the notebook on a fake
tree; DIGIT_PRESET, DIGIT_TRAIN_BUDGET, DIGIT_OVERRIDES ("KEY=value ...") and DIGIT_RUN override the
settings.

    /kaggle/input/...              read-only: the competition (and maybe an earlier version's output)
    /kaggle/working/pipeline/      PIPELINE_ROOT: data/processed, runs/RUN (checkpoints), submissions
    /kaggle/working/submission.csv what the competition scores
"""
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

COMPETITION = "digit-recognizer"
COMPETITION_FILES = ("train.csv", "test.csv")
DEFAULT_PRESET = "standard"
# A Kaggle session ends after 12 hours: train for at most 10, leaving time to prepare, predict and report.
DEFAULT_TRAIN_BUDGET = "10h"
SEARCH_DEPTH = 4  # how far below input/ to look for the CSVs or an earlier run (datasets can be deep trees)


def kaggle_root() -> Path:
    return Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))


def input_dir() -> Path:
    return kaggle_root() / "input"


def working_dir() -> Path:
    return kaggle_root() / "working"


@dataclass(frozen=True)
class Settings:
    preset: str            # a preset of configs/
    train_budget: str      # MAX_TIME of this session's training (e.g. 10h, 90m)
    overrides: tuple       # extra KEY=value settings for train
    run: str               # run name under runs/


def settings() -> Settings:
    """The kernel's settings: the defaults above, each overridable by its environment variable."""
    preset = os.environ.get("DIGIT_PRESET", DEFAULT_PRESET)
    return Settings(preset=preset,
                    train_budget=os.environ.get("DIGIT_TRAIN_BUDGET", DEFAULT_TRAIN_BUDGET),
                    overrides=tuple(shlex.split(os.environ.get("DIGIT_OVERRIDES", ""))),
                    run=os.environ.get("DIGIT_RUN", f"kaggle-{preset}"))


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
    return root


def restore_earlier_run(run, input_root=None):
    """Copy runs/RUN from an earlier version's output attached as input, unless this session has it already.

    Kaggle starts every version with an empty working/; attaching the notebook's own earlier output as an
    input lets training continue from its checkpoints. Returns the folder copied from, or None.
    """
    from pipeline import paths

    target = paths.runs() / run
    if (target / "checkpoints").is_dir() or (target / "summary.json").is_file():
        return None
    root = Path(input_root) if input_root is not None else input_dir()
    for folder in _folders(root, SEARCH_DEPTH + 3):  # <input>/<slug>/pipeline/runs/<run>
        if folder.name == run and folder.parent.name == "runs" and (folder / "config.toml").is_file():
            shutil.copytree(folder, target, dirs_exist_ok=True)
            return folder
    return None


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


def deliver_best_so_far(folder):
    """After training stopped at its time budget: model.npz and val_predictions.npz from the best checkpoint.

    The newest checkpoint stands in when no epoch has ended yet. summary.json is not written, so the run
    stays unfinished and the next `train` continues it. Ensemble runs are left alone (their finished
    members are blended). Returns model.npz's path, or None when there was nothing to deliver.
    """
    import numpy as np

    from pipeline import checkpoint, runs, train
    from pipeline.fileio import save_npz
    from pipeline.nn import build_model, select_device, to_numpy

    folder = Path(folder)
    ckpt_dir = folder / "checkpoints"
    if runs.run_of(folder).is_ensemble or not ckpt_dir.is_dir():
        return None
    best = ckpt_dir / checkpoint.BEST
    arrays = checkpoint.read(best) if best.is_file() else checkpoint.load_newest(ckpt_dir)
    if arrays is None:
        return None
    cfg = runs.load_config(folder)
    xp = select_device(cfg.device)
    model = build_model(cfg.arch, seed=cfg.seed, dtype=np.float32, xp=xp)
    model.load_state_dict(checkpoint.unpack(arrays)[0])
    _, _, x_val, y_val, val_idx = train.load_data(cfg, xp)
    _, val_acc, probs = train.evaluate(model, x_val, y_val)
    save_npz(folder / "val_predictions.npz", {"idx": val_idx, "y": to_numpy(y_val), "probs": probs.astype(np.float32)})
    save_npz(folder / "model.npz", model.state_dict())
    print(f"{folder.name}: delivering the {'best' if best.is_file() else 'newest'} checkpoint so far "
          f"(validation accuracy {val_acc:.4f}); the next run of this notebook continues the training")
    return folder / "model.npz"


def select(folder):
    """Say which model the submission comes from; for an ensemble run, choose its blend first. Returns the line."""
    from pipeline import ensemble, runs

    run = runs.run_of(folder)
    if run.is_ensemble:  # blend the finished members by held-out validation
        run_stage(ensemble.main, ["--run", run.name])
        chosen = run.ensemble_report()
        line = f"{chosen['strategy']} of {len(chosen['weights'])} members, validation estimate " \
               f"{chosen['estimate']['accuracy']:.4f}"
    elif run.finished:
        summary = run.summary()
        line = f"epoch {summary.get('best_epoch')} of {summary.get('epochs_done')}, the best by validation " \
               f"accuracy ({summary.get('best_val_acc', 0.0):.4f})"
    else:
        line = "the best checkpoint so far (training continues next run)"
    print(f"{folder.name}: {line}")
    return line


def report_folder(folder):
    """The run whose curves to show: the run itself, or for an ensemble its best finished member."""
    from pipeline import runs

    folder = Path(folder)
    run = runs.run_of(folder)
    if not run.is_ensemble:
        return folder
    done = run.finished_members()[0]
    if not done:
        return folder
    return max(done, key=lambda m: m.summary().get("best_val_acc") or 0.0).folder
