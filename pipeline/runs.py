"""The run folder: what `train` writes and `predict`, `submit`, `report`, `ensemble` read.

runs/NAME/
  config.toml            the resolved TrainConfig (plus `preset`)
  metrics.jsonl          one record per epoch: epoch, train_loss, train_acc, val_loss, val_acc, lr,
                         images_per_s, wall_time_s
  checkpoints/           latest / previous / best training state (resume)
  model.npz              the delivered weights (best by validation): Model.state_dict()
  summary.json           arch, best_val_acc, best_val_loss, best_epoch, epochs_done, wall_time_s, finished
  val_predictions.npz    idx (rows of data/processed/train.npz), y, probs float32 (n_val, 10) of model.npz
  test_probs.npz         probs float32 (M, 10) on test.csv (written by predict)
  report/                figures (written by report)
"""
import json
import re

from pipeline import paths
from pipeline.config import TrainConfig, apply_values, load_toml
from pipeline.errors import UserError
from pipeline.fileio import load_npz

# A run, or one member of an ensemble run ("night/members/3").
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}(/members/[0-9]+)?$")


def run_dir(name):
    if not RUN_NAME.match(str(name)):
        raise UserError(f"invalid run name '{name}': use letters, digits, '.', '_' and '-' (or NAME/members/K)")
    return paths.runs() / name


def existing_run(name):
    """The folder of a run that exists; a UserError telling how to make it otherwise."""
    folder = run_dir(name)
    if not folder.is_dir():
        raise UserError(f"run '{name}' not found in {folder.parent}: train it first (`make train RUN={name}`)")
    return folder


def load_config(folder) -> TrainConfig:
    path = folder / "config.toml"
    if not path.is_file():
        raise UserError(f"{path} is missing: train the run first (`make train RUN={folder.name}`)")
    data = load_toml(path)
    data.pop("preset", None)
    return apply_values(TrainConfig(), data, source=str(path))


def load_summary(folder):
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(folder, xp=None):
    """Build the run's architecture and load model.npz into it."""
    import numpy as np

    from pipeline.nn import build_model

    cfg = load_config(folder)
    path = folder / "model.npz"
    if not path.is_file():
        raise UserError(f"{path} is missing: the run has not finished training (`make train RUN={folder.name}`)")
    model = build_model(cfg.arch, seed=cfg.seed, dtype=np.float32, xp=xp or np)
    try:
        model.load_state_dict(load_npz(path))
    except ValueError as exc:
        raise UserError(f"{path} does not fit architecture {cfg.arch}: {exc}") from None
    return model
