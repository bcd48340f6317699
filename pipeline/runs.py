"""The run: one object that knows its own state. Stages ask it; they never test paths themselves.

runs/NAME/
  .lock                  fcntl lock: one writer (train, ensemble) or readers (predict, submit, report)
  config.toml            the resolved TrainConfig (plus `preset`); the checkpoint carries the same config
  metrics.jsonl          one record per epoch: epoch, train_loss, train_acc, val_loss, val_acc, lr,
                         images_per_s, wall_time_s
  checkpoints/           latest / previous / best training state (resume), each with its config
  model.npz              the delivered weights (best by validation): Model.state_dict()
  summary.json           arch, best_val_acc, best_val_loss, best_epoch, epochs_done, wall_time_s, finished
  val_predictions.npz    idx (rows of data/processed/train.npz), y, probs float32 (n_val, 10) of model.npz
  test_probs.npz         probs float32 (M, 10) on test.csv (written by predict), and `made_from`: the
                         fingerprint of the data and of the model they were computed from
  members/K/             an ensemble's members, each a run of its own (NAME/members/K); their
                         test_probs.npz / test_probs_tta.npz are caches carrying `made_from` as well
  ensemble.json          the blend chosen by validation (ensemble runs)
  report/                figures (written by report)

A cached prediction is used only when its `made_from` matches the data and model of now: a mismatch
means recompute, never reuse.
"""
import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from pipeline import console, paths
from pipeline.config import TrainConfig, apply_values, load_toml
from pipeline.errors import UserError
from pipeline.fileio import file_sha256, held_lock, json_loads, load_npz, read_json_object, save_npz

# A run, or one member of an ensemble run ("night/members/3").
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}(/members/[0-9]+)?$")
NUM_CLASSES = 10
TEST_PROBS = "test_probs.npz"
LOCK = ".lock"
# How a run is executed, not what it computes: these may differ between invocations of one run.
RUN_CONTROL = ("max_time", "ckpt_every", "device")
CHANCE_LEVEL = 0.2  # a delivered model below this validation accuracy learned next to nothing


def check_name(name):
    if not RUN_NAME.fullmatch(str(name)):  # fullmatch: `$` alone also matches before a final newline
        raise UserError(f"invalid run name '{name}': up to 100 letters, digits, '.', '_' and '-', beginning with a "
                        f"letter or digit (or NAME/members/K)")
    return str(name)


def run_dir(name):
    return paths.runs() / check_name(name)


def data_fingerprint():
    """sha256 of data/processed/meta.json, which names the input CSVs and the test array by their hashes."""
    path = paths.data_processed() / "meta.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: run `make prepare` first") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}: run `make prepare` again") from None


def check_probs(probs, n_rows, what="probabilities"):
    """Raise UserError unless probs is (n_rows, 10), finite, non-negative, rows summing to 1."""
    if probs.ndim != 2 or probs.shape != (n_rows, NUM_CLASSES):
        raise UserError(f"{what}: expected shape ({n_rows}, {NUM_CLASSES}), got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise UserError(f"{what}: {int(np.sum(~np.isfinite(probs)))} values are NaN or infinite")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise UserError(f"{what}: rows are not probability distributions (negative or not summing to 1)")


def same_config(a, b):
    """Two config dicts (or TrainConfigs) agree on everything but how the run is executed."""
    a = a.to_dict() if isinstance(a, TrainConfig) else dict(a)
    b = b.to_dict() if isinstance(b, TrainConfig) else dict(b)
    return config_changes(a, b) == []


def config_changes(a, b):
    """Keys whose values differ between two config dicts, RUN_CONTROL and `preset` aside. A key one side
    lacks counts as its default (a config recorded before the setting existed)."""
    defaults = TrainConfig().to_dict()
    a, b = {**defaults, **a}, {**defaults, **b}
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in RUN_CONTROL and k != "preset"]
    if prepared_split(a) and prepared_split(b):
        keys.remove("val_fraction")  # unused: the split is prepare's, which the checkpoint's data record checks
    return [k for k in keys if a.get(k) != b.get(k)]


def prepared_split(config):
    """Whether a config (dict) trains on the split prepare wrote (split_seed -1), which its val_fraction does not
    choose: `make train VAL_FRACTION=...` asks prepare for it, and a checkpoint records the split it began on."""
    seed = config.get("split_seed", TrainConfig().split_seed)
    return isinstance(seed, int) and seed < 0


class Run:
    """runs/NAME (or NAME/members/K): its state, its lock, its config and its artifacts."""

    def __init__(self, name, folder=None):
        self.name = check_name(name) if folder is None else str(name)
        self.folder = paths.runs() / self.name if folder is None else folder

    def __repr__(self):
        return f"Run({self.name!r})"

    @classmethod
    def existing(cls, name):
        """A run that exists; a UserError telling how to make it otherwise."""
        run = cls(name)
        if run.is_member:
            parent = run.parent
            if not parent.folder.is_dir():
                how = f"PRESET={parent.name}" if (paths.configs() / f"{parent.name}.toml").is_file() \
                    else f"RUN={parent.name}"
                raise UserError(f"run '{parent.name}' not found in {parent.folder.parent}: "
                                f"train it first (`make train {how}`)")
            if not parent.is_ensemble:
                raise UserError(f"runs/{parent.name} is not an ensemble: it has no members "
                                f"(use RUN={parent.name})")
            if not run.folder.is_dir():
                have = ", ".join(m.name.rsplit("/", 1)[-1] for m in parent.members()) or "none yet"
                raise UserError(f"runs/{parent.name} has no member {run.name.rsplit('/', 1)[-1]} "
                                f"(members: {have})")
            return run
        if not run.folder.is_dir():
            how = f"PRESET={name}" if (paths.configs() / f"{name}.toml").is_file() else f"RUN={name}"
            raise UserError(f"run '{name}' not found in {run.folder.parent}: train it first (`make train {how}`)")
        return run

    # ---------------------------------------------------------------- what it is

    @property
    def is_member(self):
        return "/members/" in self.name

    @property
    def parent(self):
        """The ensemble a member belongs to (None for a run of its own)."""
        return Run(self.name.split("/", 1)[0]) if self.is_member else None

    @property
    def root(self):
        """The top-level run: the one whose lock covers this run."""
        return self.parent or self

    @property
    def is_ensemble(self):
        if self.is_member:
            return False
        if (self.folder / "members").is_dir():
            return True
        try:
            return self.config().members > 1
        except UserError:
            return False

    def members(self):
        """Member runs (NAME/members/K) in the order of K."""
        root = self.folder / "members"
        if self.is_member or not root.is_dir():
            return []
        ks = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())
        return [Run(f"{self.name}/members/{k}") for k in ks]

    def member(self, k):
        return Run(f"{self.name}/members/{k}")

    @property
    def finished(self):
        """Training has delivered everything: an ensemble's summary and every member; a single run's summary
        (finished), model, validation predictions, metrics and config, each readable."""
        try:
            summary = self.summary()
            if not summary.get("finished"):
                return False
            if self.is_ensemble:
                members = self.members()
                return len(members) >= int(summary.get("members", 0)) and all(m.finished for m in members)
            self.config()
            self.metrics()
            self.val_predictions()
            load_npz(self.folder / "model.npz")
            return True
        except Exception:  # noqa: BLE001 (a UserError, or a damaged zip's BadZipFile and friends: not finished)
            return False

    def finished_members(self):
        """(finished member runs, names of the unfinished ones)."""
        if not self.is_ensemble:
            raise UserError(f"runs/{self.name} has no members/: train it with an ensemble preset "
                            f"(`make train PRESET=overnight RUN={self.name}`)")
        done, skipped = [], []
        for member in self.members():
            (done if member.finished else skipped).append(member)
        skipped = [m.name.rsplit("/", 1)[-1] for m in skipped]
        # the members its config asks for that have no folder (not begun, or deleted): left out as well
        try:  # a damaged config.toml is said by the stages that read it (train restores it): not here
            expected = self.config().members if (self.folder / "config.toml").is_file() else 0
        except UserError:
            expected = 0
        on_disk = {m.name.rsplit("/", 1)[-1] for m in done} | set(skipped)
        missing = [str(k) for k in range(expected) if str(k) not in on_disk]
        return done, sorted(skipped + missing, key=int)

    # ---------------------------------------------------------------- its lock

    @contextlib.contextmanager
    def lock(self, what, shared=False):
        """Hold runs/NAME/.lock (the top-level run's) for the block: one writer, or any number of readers.

        fcntl.flock: the kernel drops it when the holder dies, even by kill -9. Never waits: a run in use
        is refused at once with one line naming the holder.
        """
        root = self.root
        created = not root.folder.exists()
        if not shared:
            root.folder.mkdir(parents=True, exist_ok=True)
        path = root.folder / LOCK
        note = f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"

        def busy(holder):
            return (f"runs/{root.name} is in use by {holder}: wait until it ends, or stop it (a stopped training "
                    f"resumes later)")

        with held_lock(path, note, busy, shared=shared):
            try:
                yield self
            finally:
                if created and os.listdir(root.folder) == [LOCK]:  # refused before anything was written: no trace
                    os.unlink(path)
                    try:
                        os.rmdir(root.folder)
                    except OSError:  # another command opened the lock meanwhile: the folder is its now
                        pass

    # ---------------------------------------------------------------- its config

    def config(self) -> TrainConfig:
        """The config the run was trained with, from config.toml (train checks it against the checkpoint)."""
        path = self.folder / "config.toml"
        if not path.is_file():
            raise UserError(f"{path} is missing: train the run first (`make train RUN={self.root.name}`)")
        data = load_toml(path, advice=f"`make train RUN={self.root.name}` restores it from the checkpoint")
        data.pop("preset", None)
        return apply_values(TrainConfig(), data, source=str(path))

    def preset(self, default=None):
        try:
            return load_toml(self.folder / "config.toml").get("preset", default)
        except UserError:
            return default

    # ---------------------------------------------------------------- its artifacts

    def _advice_train(self):
        return f"`make train RUN={self.root.name}` rebuilds it"

    def summary(self):
        """summary.json as a dict ({} when training has not finished)."""
        path = self.folder / "summary.json"
        if not path.is_file():
            return {}
        return read_json_object(path, self._advice_train())

    def metrics(self):
        """Epoch records of metrics.jsonl sorted by epoch; a resumed run's repeated epoch keeps its last record."""
        path = self.folder / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"{path} is missing: train the run first (`make train RUN={self.root.name}`)")
        by_epoch = {}
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{path} is damaged (not text): {self._advice_train()}") from None
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json_loads(line)
            except ValueError as exc:  # bad JSON, nesting too deep, an integer of 4300+ digits
                raise UserError(f"{path} line {line_no}: invalid JSON ({getattr(exc, 'msg', exc)}): "
                                f"{self._advice_train()}") from None
            if not isinstance(record, dict) or "epoch" not in record:
                raise UserError(f"{path} line {line_no}: no 'epoch' field: {self._advice_train()}")
            epoch = record["epoch"]
            if type(epoch) is not int or epoch < 0:  # noqa: E721 (a bool is an int, and no epoch)
                raise UserError(f"{path} line {line_no}: epoch {json.dumps(epoch)} is not a whole number: "
                                f"{self._advice_train()}")
            odd = [k for k, v in record.items() if v is not None and type(v) not in (int, float)]  # noqa: E721
            if odd:  # the figures are drawn from every field: a string there was a traceback in `make report`
                raise UserError(f"{path} line {line_no}: {odd[0]} is {json.dumps(record[odd[0]])}, not a number: "
                                f"{self._advice_train()}")
            by_epoch[epoch] = record
        if not by_epoch:
            raise UserError(f"{path} has no epoch records: train the run first (`make train RUN={self.root.name}`)")
        return [by_epoch[e] for e in sorted(by_epoch)]

    def _npz(self, name, advice):
        path = self.folder / name
        if not path.is_file():
            if path.exists() or path.is_symlink():  # a folder in its place: make takes it as built, every time
                raise UserError(f"{path} is not a file: remove it, then {advice}")
            return None
        try:
            return load_npz(path)
        except Exception as exc:  # noqa: BLE001 (BadZipFile, EOFError, ValueError, ...: all mean damaged)
            raise UserError(f"{path} is damaged ({type(exc).__name__}): {advice}") from None

    def val_predictions(self):
        """(idx int64 (n,), y int64 (n,), probs float32 (n, 10)) of the delivered model on validation."""
        path = self.folder / "val_predictions.npz"
        d = self._npz("val_predictions.npz", self._advice_train())
        if d is None:
            raise UserError(f"{path} is missing: the run has not finished training (`make train RUN={self.root.name}`)")
        missing = {"idx", "y", "probs"} - set(d)
        if missing:
            raise UserError(f"{path} lacks {', '.join(sorted(missing))}: {self._advice_train()}")
        if d["idx"].dtype.kind not in "iu" or d["y"].dtype.kind not in "iu" or d["probs"].dtype.kind != "f":
            raise UserError(f"{path}: idx {d['idx'].dtype}, y {d['y'].dtype}, probs {d['probs'].dtype} are not "
                            f"integer rows, labels and probabilities: {self._advice_train()}")
        idx, y, probs = d["idx"].astype(np.int64), d["y"].astype(np.int64), d["probs"]
        if idx.ndim != 1 or probs.shape != (len(idx), NUM_CLASSES) or y.shape != idx.shape:
            raise UserError(f"{path}: idx {idx.shape}, y {y.shape}, probs {probs.shape} do not agree: "
                            f"{self._advice_train()}")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):  # report's confusion matrix raised on them
            raise UserError(f"{path}: a label outside 0-{NUM_CLASSES - 1} ({y.min()}..{y.max()}): "
                            f"{self._advice_train()}")
        return idx, y, probs

    def model_state(self):
        path = self.folder / "model.npz"
        state = self._npz("model.npz", self._advice_train())
        if state is None:
            raise UserError(f"{path} is missing: the run has not finished training (`make train RUN={self.root.name}`)")
        return state

    def load_model(self, xp=None):
        """Build the run's architecture and load model.npz into it."""
        from pipeline.nn import build_model

        cfg = self.config()
        state = self.model_state()
        model = build_model(cfg.arch, seed=cfg.seed, dtype=np.float32, xp=xp or np)
        try:
            model.load_state_dict(state)
        except ValueError as exc:
            trained_as = self.checkpoint_config().get("arch")
            if isinstance(trained_as, str) and trained_as != cfg.arch:  # a hand edit: the model is fine
                raise UserError(f"{self.folder / 'config.toml'} says arch {cfg.arch}, but the run trained "
                                f"{trained_as} (its checkpoint's record): config.toml was edited; undo the edit "
                                f"(arch = \"{trained_as}\")") from None
            raise UserError(f"{self.folder / 'model.npz'} does not fit architecture {cfg.arch}: {exc}: remove it, "
                            f"summary.json and checkpoints/ from {self.folder}, then `make train "
                            f"RUN={self.root.name}` trains it again") from None  # (a kept summary kept old reports)
        return model

    def checkpoint_config(self):
        """The config the run's newest checkpoint records ({} without one, or from before the record)."""
        from pipeline import checkpoint

        arrays = checkpoint.load_newest(self.folder / "checkpoints")
        recorded = checkpoint.unpack(arrays)[3].get("config") if arrays is not None else None
        return recorded if isinstance(recorded, dict) else {}

    def ensemble_report(self):
        """ensemble.json as a dict, or None before the first blend."""
        path = self.folder / "ensemble.json"
        if not path.is_file():
            return None
        advice = f"`make ensemble RUN={self.name}` rewrites it"
        data = read_json_object(path, advice)
        if not {"strategy", "weights", "estimate"} <= set(data):
            raise UserError(f"{path} is damaged (not a blend record): {advice}")
        number = (int, float)
        weights, estimate = data["weights"], data["estimate"]
        if not isinstance(data["strategy"], str) or not isinstance(weights, dict) or not isinstance(estimate, dict) \
                or not all(type(w) in number for w in weights.values()) \
                or type(estimate.get("accuracy")) not in number:  # a hand edit; every key there, wrong types
            raise UserError(f"{path} is damaged (a field of the wrong type): {advice}")
        return data

    def learnt_train_sha256(self):
        """The sha256 of the train.csv the run learnt (an ensemble: its finished members', when they agree), or
        None when no summary records it (runs from before it was recorded) or members disagree."""
        learners = [m for m in self.members() if m.finished] if self.is_ensemble else [self]
        shas = [r.summary().get("train_sha256") for r in learners]
        known = {sha for sha in shas if isinstance(sha, str)}  # (anything else is a hand edit: none recorded)
        return known.pop() if len(known) == 1 and len(shas) == sum(isinstance(sha, str) for sha in shas) else None

    # ---------------------------------------------------------------- predictions and what they were made from

    def made_from(self, data=None):
        """What this run's predictions depend on now: the data and the delivered model (or blend). `data`: the
        data fingerprint taken before the test images were read, so that a `make prepare` running meanwhile
        leaves predictions marked stale rather than fresh."""
        source = {"data": data or data_fingerprint()}
        if self.is_ensemble:
            path = self.folder / "ensemble.json"
            source["blend"] = file_sha256(path) if path.is_file() else None
            # and every member's model: ensemble.json names its members but not their weights, so a member
            # retrained, deleted or delivered since the blend leaves the blend's probabilities stale (one that
            # only started training since has no model yet, and changes nothing)
            # (only finished members: a blend uses no other, so one finished since, or repaired, makes it stale)
            models = {m.name.rsplit("/", 1)[-1]: m.made_from(source["data"])["model"] for m in self.members()
                      if m.finished}
            source["members"] = {k: sha for k, sha in models.items() if sha is not None}
        else:
            path = self.folder / "model.npz"
            source["model"] = file_sha256(path) if path.is_file() else None
        return source

    def predict_probs(self, x, xp=np, batch_size=1000):
        """Probabilities of the run's model on images x (N, 28, 28, 1) float32 in [0, 1]: numpy float32 (N, 10)."""
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        # with a progress bar: the test set takes the standard net about 25 s on 2 cores, and an overnight
        # ensemble with test-time shifts 75 such passes
        bar = console.progress_bar(len(x), f"predict {self.name}", leave=False, unit="image")
        probs = self.load_model(xp).predict_proba(x, batch_size=batch_size, on_batch=bar.update)
        bar.close()
        check_probs(probs, len(x), what=f"{self.name} predictions")
        return probs

    def write_probs(self, probs, name=TEST_PROBS, made_from=None, to=None):
        """Write folder/name (or `to`, a temp path that will become it): probs float32 (M, 10) and the record of
        what they were made from, atomically."""
        path = to or self.folder / name
        record = json.dumps(made_from or self.made_from(), sort_keys=True)
        save_npz(path, {"probs": np.asarray(probs, dtype=np.float32), "made_from": np.array(record)})
        return path

    def cached_probs(self, name, n_rows, made_from=None):
        """The probabilities in folder/name if they were made from the data and model of now (and have n_rows
        rows); None when they must be recomputed."""
        try:
            d = load_npz(self.folder / name)
            record = json_loads(str(d["made_from"]))
            probs = d["probs"]
        except Exception:  # noqa: BLE001 (missing, damaged or without a record: recompute)
            return None
        if record != (made_from or self.made_from()) or probs.shape != (n_rows, NUM_CLASSES):
            return None
        return probs

    def test_probs(self, n_rows):
        """test_probs.npz, checked: made from the data and model of now, one row per test image."""
        path = self.folder / TEST_PROBS
        advice = f"rerun `make predict RUN={self.name}`, which recomputes them"
        d = self._npz(TEST_PROBS, advice)
        if d is None:
            raise UserError(f"{path} is missing: run `make predict RUN={self.name}` first")
        if "probs" not in d:
            raise UserError(f"{path} has no 'probs' array: {advice}")
        try:
            record = json_loads(str(d.get("made_from")))
        except ValueError:
            record = None
        if record != self.made_from():
            what = "another model" if isinstance(record, dict) and record.get("data") == data_fingerprint() \
                else "other data (data/processed changed since)"
            raise UserError(f"{path} was made from {what}: {advice}")
        probs = d["probs"]
        if probs.ndim != 2 or probs.shape != (n_rows, NUM_CLASSES):
            raise UserError(f"{path} has shape {probs.shape} but test.csv has {n_rows} rows: {advice}")
        check_probs(probs, n_rows, what=str(path))  # NaN rows would argmax to a silent 0
        return probs


def run_of(folder):
    """The Run of a folder: runs/NAME or runs/NAME/members/K by name; any other folder as it is."""
    rel = os.path.relpath(os.path.abspath(folder), os.path.abspath(paths.runs())).replace(os.sep, "/")
    if RUN_NAME.match(rel):
        return Run(rel)
    return Run(Path(folder).name, folder=Path(folder))


def load_config(folder) -> TrainConfig:
    return run_of(folder).config()


def load_summary(folder):
    return run_of(folder).summary()
