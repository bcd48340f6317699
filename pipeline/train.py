"""Train a model from a preset into runs/NAME/, resuming bit-exactly from the newest checkpoint.

    python -m pipeline.train --preset quick --run myrun EPOCHS=5 LR=2e-3

Reads top to bottom: options, init or resume, data, model and optimizer, one loop, final outputs.
Every random draw is a pure function of (seed, epoch, step) or lives in the checkpoint, so a run killed
at any moment and resumed ends with the very same weights as one that never stopped.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
import warnings

import numpy as np

from pipeline import checkpoint, console, dataset, paths, runs
from pipeline.augment import random_affine
from pipeline.averaging import WeightAverage
from pipeline.config import (TRAIN_VARIABLES, TrainConfig, apply_values, build_config, load_toml, make_overrides,
                             stage_variables, to_toml)
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import atomic_paths, json_loads, save_npz, write_json, write_text
from pipeline.nn import (build_model, configure_threads, get_array_module, make_optimizer, make_schedule,
                         select_device, softmax, softmax_cross_entropy, to_numpy)
from pipeline.nn.threads import num_threads

DEFAULT_PRESET = "standard"
# An ensemble's recorded config (it has no checkpoint of its own to carry it): config.toml is its copy to read.
ENSEMBLE_RECORD = ".config.json"
# How a run is executed, not what it computes: these may change on resume without FORCE.
RUN_CONTROL = runs.RUN_CONTROL
CKPT_SECONDS = 120.0  # default checkpoint cadence: about every 2 minutes of work
# Clean training images whose statistics the BatchNorms of the weight average get (about 4 % of an epoch's
# work for deotte): per channel that is 5 000 to 3.4 million values, plenty for a mean and a variance.
CALIBRATION_ROWS = 5000
# What resuming reads from a checkpoint's training state, and its type: a state rewritten by hand (its checksum
# with it) that lacks one is refused in one line, not a KeyError mid-resume.
RESUMED_STATE = {"epoch": int, "step": int, "bad_epochs": int, "done": bool, "history": list, "epoch_sums": dict,
                 "wall_time_s": (int, float), "best_score": (int, float, type(None)),
                 "best_epoch": (int, type(None))}
BAG_STREAM = 0xBA6  # the bag's own random stream, apart from the seed's others (weights, batches, augmentation)


def parse_args(argv):
    ap = StageArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help=f"preset in configs/ (default: {DEFAULT_PRESET}, or the run's own on resume)")
    ap.add_argument("--run", help="run name under runs/ (default: the preset's name)")
    ap.add_argument("--force", action="store_true", help="resume even though the config changed")
    ap.add_argument("--make-vars", action="store_true",
                    help="also read make's command-line variables (PIPELINE_MAKE_VARS, set by the Makefile)")
    ap.add_argument("--check-config", action="store_true",
                    help="refuse what training would refuse in the run's config, then stop (`make train "
                         "VAL_FRACTION=...` asks before it splits the data again)")
    ap.add_argument("overrides", nargs="*", help="KEY=value settings (EPOCHS=3 LR=1e-3 ...)")
    args = ap.parse_args(argv)
    for item in args.overrides:  # typed on train's own command line: make's variables are not read here
        key = item.split("=", 1)[0]
        if key.upper() in ("RUN", "PRESET"):
            value = item.split("=", 1)[1] if "=" in item else ""
            raise UserError(f"{item}: on this command line the {key.lower()} is --{key.lower()} "
                            f"(`python -m pipeline.train --{key.lower()} {value or 'NAME'}`); {key.upper()}= is make's")
        if key.upper() in stage_variables() - TRAIN_VARIABLES:
            raise UserError(f"{item}: {key.upper()} is read by make (`make ... {key.upper()}=...`), not by train")
    if args.make_vars:
        args.overrides = make_overrides() + args.overrides
        from_env = os.environ.get("PIPELINE_ENV_SETTINGS", "").split()
        if from_env:  # an exported SEED=42 meant for something else would otherwise train unsaid
            given = ", ".join(f"{name}={os.environ.get(f'PIPELINE_VAR_{name}', '')}" for name in from_env)
            print(f"note: {given} from the environment", file=sys.stderr)
    env_force = [o for o in args.overrides if o.upper().startswith("FORCE=")]
    if env_force:
        value = env_force[-1].split("=", 1)[1]
        if value not in ("", "0", "1"):  # `FORCE=no` forced: any other text than 0 did
            raise UserError(f"FORCE='{value}' is not a switch: use FORCE=1 or FORCE=0")
        args.force = args.force or value == "1"
    return args


MAX_SECONDS = 366 * 24 * 3600  # a MAX_TIME beyond this is a typo (and 1e309 seconds overflowed to a traceback)


def parse_duration(text):
    """'8h', '90m', '45s', '1h30m' or plain seconds -> seconds (0, like empty, for no limit)."""
    typed = text = text.strip().lower()
    if not text:
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        text = f"{text}s"
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise UserError(f"MAX_TIME: cannot read '{text}' (use e.g. 8h, 90m, 1h30m)")
    seconds = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise UserError(f"MAX_TIME: '{typed}' is more than a year; leave MAX_TIME empty for no limit")
    return seconds


def ensemble_record(folder):
    """The config an ensemble recorded in ENSEMBLE_RECORD (what a checkpoint is to a single run), or None."""
    try:
        record = json_loads((folder / ENSEMBLE_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        warnings.warn(f"{folder / ENSEMBLE_RECORD} is damaged; config.toml is taken as it is", stacklevel=2)
        return None
    return record if isinstance(record, dict) else None


def record_ensemble_config(folder, preset, cfg):
    """Write the ensemble's config: the record train checks against, and config.toml, its copy to read."""
    config = {"preset": preset, **cfg.to_dict()}
    # both on disk before either is moved in: a kill between two writes left a config.toml that read as an edit
    with atomic_paths([folder / ENSEMBLE_RECORD, folder / "config.toml"]) as (record, copy):
        write_json(record, config)
        write_text(copy, to_toml(config))


def recorded_config(folder, force):
    """(recorded, config): the run's config as its checkpoint recorded it, and the one to continue with, which is
    the same unless FORCE=1 adopts an edit of config.toml ({}, {} for a new run).

    config.toml is only a copy for people to read: an edited one is refused (FORCE=1 adopts the edit, which
    resolve_config then treats as any forced change), a damaged or missing one is restored from the checkpoint.
    An ensemble has no checkpoint of its own: its record, ENSEMBLE_RECORD, stands in. Runs checkpointed
    (ensembles started) before configs were recorded fall back to config.toml.
    """
    saved_path = folder / "config.toml"
    arrays = checkpoint.load_newest(folder / "checkpoints")
    recorded = checkpoint.unpack(arrays)[3].get("config") if arrays is not None else ensemble_record(folder)
    if recorded is None:
        on_file = load_toml(saved_path, advice="remove it to start the run afresh") if saved_path.is_file() else {}
        return on_file, dict(on_file)
    try:
        on_file = load_toml(saved_path) if saved_path.is_file() else None
    except UserError as exc:
        on_file = None
        warnings.warn(f"{exc}; restoring it from the {'checkpoint' if arrays is not None else 'ensemble record'}",
                      stacklevel=2)
    if on_file is None:
        write_text(saved_path, to_toml(recorded))
        return dict(recorded), dict(recorded)
    changed = runs.config_changes(recorded, on_file)
    if on_file.get("preset", DEFAULT_PRESET) != recorded.get("preset", DEFAULT_PRESET):
        changed.insert(0, "preset")
    if changed and not force:
        shown = ", ".join(f"{k} {recorded.get(k)!r} -> {on_file.get(k)!r}" for k in changed)
        where = "checkpoint" if arrays is not None else "record"
        raise UserError(f"{saved_path} does not match the config in the run's {where} ({shown}): config.toml "
                        f"was edited, or the {where} is another run's; undo the edit, or FORCE=1 to continue "
                        f"with config.toml's values")
    return dict(recorded), dict(on_file) if changed else dict(recorded)


def finished_members_note(folder):
    """For a forced change of an ensemble: the finished members, which keep the config they were trained with."""
    if not (folder / "members").is_dir():
        return ""
    done, _ = runs.run_of(folder).finished_members()
    names = [m.name.rsplit("/", 1)[-1] for m in done]
    return f"; finished member{'s' if len(names) > 1 else ''} {', '.join(names)} keep{'' if len(names) > 1 else 's'} " \
           f"the config {'they were' if len(names) > 1 else 'it was'} trained with" if names else ""


# Settings a preset gained after runs were started with it: a run whose record lacks one keeps the default it
# trained with when the preset is named again (`make train PRESET=overnight` on an ensemble from before).
PREDATED = ("member_archs",)


def resolve_config(args, folder):
    """New run: preset + overrides. Existing run: its own config; a different one is refused unless forced."""
    saved_path = folder / "config.toml"
    recorded, saved = recorded_config(folder, args.force)  # saved: the recorded config, or an edit FORCE=1 adopts
    named_after = folder.name if (paths.configs() / f"{folder.name}.toml").is_file() else None
    if not saved:
        if not args.preset and named_after not in (None, DEFAULT_PRESET):  # `make train RUN=quick`: standard
            raise UserError(f"RUN={folder.name} is a preset's name, and a new run trains the default preset "
                            f"({DEFAULT_PRESET}): say which, `make train PRESET={folder.name}` or "
                            f"`make train PRESET={DEFAULT_PRESET} RUN={folder.name}`")
        preset = args.preset or DEFAULT_PRESET
        return preset, build_config(preset, args.overrides)
    saved_preset = saved.pop("preset", DEFAULT_PRESET)
    recorded_preset = recorded.pop("preset", DEFAULT_PRESET)
    if not args.preset and named_after and named_after != saved_preset:
        print(f"note: runs/{folder.name} was trained with preset {saved_preset}, not {named_after}")
    preset = args.preset or saved_preset
    if args.preset:
        wanted = build_config(preset, args.overrides)
        given = {item.split("=", 1)[0].lower() for item in args.overrides}
        for key in PREDATED:  # a setting the preset gained after the run started: the run keeps what it had
            if key not in saved and key not in given:
                setattr(wanted, key, getattr(TrainConfig(), key))
    else:
        wanted = apply_values(TrainConfig(), saved, str(saved_path), overrides=args.overrides)
    # what the run was trained with: an edit FORCE=1 adopts is a change like an override, under the same guards
    current = apply_values(TrainConfig(), recorded, source=str(saved_path))
    for key in RUN_CONTROL:
        setattr(current, key, getattr(wanted, key))
    changed = runs.config_changes(current.to_dict(), wanted.to_dict())  # as every config comparison (val_fraction)
    if changed or preset != recorded_preset:
        if preset != recorded_preset:
            changed.insert(0, "preset")
        if changed == ["members"] and current.members > 1 and wanted.members > current.members:
            # more members of the same config: what each one trains with is unchanged, so no FORCE is needed
            print(f"runs/{folder.name}: from {current.members} to {wanted.members} members")
            return preset, wanted
        if not args.force:
            raise UserError(f"runs/{folder.name} was started with another config (changed: {', '.join(changed)}); "
                            f"{console.next_step('restart', run=folder.name)}")
        more_members = wanted.members > current.members > 1  # an ensemble's new members do take the change
        if runs.run_of(folder).finished and not more_members:  # "nothing to do", its old config kept, exit 0
            raise UserError(f"runs/{folder.name} has finished training, so FORCE=1 cannot continue it with changed "
                            f"{', '.join(changed)}: train the new config under another RUN=")
        if wanted.members > 1 and not (folder / "members").is_dir() and \
                checkpoint.load_newest(folder / "checkpoints") is not None:  # it would refuse every later resume
            raise UserError(f"runs/{folder.name} holds a single net: MEMBERS={wanted.members} would turn it into an "
                            f"ensemble it could not continue; train the ensemble under another RUN=")
        print(f"FORCE: continuing runs/{folder.name} with changed {', '.join(changed)}{finished_members_note(folder)}",
              file=sys.stderr)
        return preset, wanted
    return preset, current


def training_data(cfg):
    """What a run's training and validation rows are drawn from: train.csv (by its hash) and the split. A run
    resumed on other ones would judge its epochs on rows it trained on, and never say so."""
    meta = dataset.load_meta()
    split = [cfg.split_seed, cfg.val_fraction] if cfg.split_seed >= 0 else [meta.get("split_seed"),
                                                                             meta.get("val_fraction")]
    return {"train_sha256": meta.get("train_sha256"), "split": split}


def restore_advice(started, now):
    """How to put back the split a run started on, when only the split changed (`make train VAL_FRACTION=...`
    prepares the shared data again, even when train then refuses)."""
    split = started.get("split")
    if started.get("train_sha256") != now.get("train_sha256") or not isinstance(split, list) or len(split) != 2:
        return ""
    seed, fraction = split
    if seed == now["split"][0]:
        return f"`make prepare VAL_FRACTION={fraction}` puts back the split it started on; or "
    return (f"`python -m pipeline.prepare --val-fraction {fraction} --split-seed {seed}` puts back the split it "
            f"started on; or ")


def load_data(cfg, xp):
    x, y = dataset.load_train()
    if cfg.split_seed < 0:
        train_idx, val_idx = dataset.load_split()
    else:
        train_idx, val_idx = dataset.stratified_split(y, cfg.val_fraction, cfg.split_seed)
    if len(val_idx) == 0:
        raise UserError("the validation split is empty, so no epoch could be judged: train.csv needs at least "
                        "2 rows of a digit (run `make prepare` again with more data)")
    train_idx = bagged(train_idx, cfg.bag, cfg.seed)
    # labels stay on the host: the loss checks them there for free, and they are small
    return xp.asarray(x[train_idx]), y[train_idx], xp.asarray(x[val_idx]), y[val_idx], val_idx


def bagged(train_idx, bag, seed):
    """The training rows a net sees: all of them, or (bag < 1) its own random fraction `bag` of them, drawn from
    its seed. Deotte's members each train on a random 90 % of train.csv; here every member of an ensemble still
    holds out the same validation rows, so blends stay compared like for like, and the rows a member leaves
    out besides those are simply unused."""
    if bag >= 1.0:
        return train_idx
    n = int(round(len(train_idx) * bag))
    if n < 2:  # a BatchNorm in training needs two values per channel, and the last ones see one pixel an image
        raise UserError(f"BAG={bag} leaves {n} of the {len(train_idx)} training rows to train on: at least 2 are "
                        f"needed")
    rng = np.random.default_rng([seed, BAG_STREAM])  # a stream of its own: weights and batches draw as before
    return np.sort(rng.choice(train_idx, size=n, replace=False))


def evaluate(model, x, y, batch_size=1000):
    """Mean loss, accuracy and probabilities (numpy) in eval mode."""
    probs, total = [], 0.0
    inference = model.for_inference()  # BatchNorms folded into their convolutions, with today's statistics
    for i in range(0, len(x), batch_size):
        logits = inference.forward(x[i:i + batch_size], train=False)
        loss, _ = softmax_cross_entropy(logits, y[i:i + batch_size])
        total += float(loss) * len(logits)
        probs.append(to_numpy(softmax(logits)))
    inference.forget_activations()  # the last batch's, on the device until the next step otherwise
    probs = np.concatenate(probs) if probs else np.zeros((0, 10), np.float32)
    n = max(len(x), 1)
    return total / n, float((probs.argmax(1) == to_numpy(y)).mean()) if len(x) else 0.0, probs


def step_totals(loss, logits, y):
    """(loss as a float, count of correct predictions) of a training step: one transfer from the device."""
    xp = get_array_module(logits)
    correct = (logits.argmax(1) == xp.asarray(y)).sum()
    both = to_numpy(xp.stack([xp.asarray(loss, dtype=xp.float64), correct.astype(xp.float64)]))
    return float(both[0]), int(both[1])


def batches_per_epoch(n, batch_size):
    """Steps per epoch; a last batch of a single image joins the one before (BatchNorm needs two)."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n % batch_size == 1 else steps


def epoch_order(seed, epoch, n):
    """The permutation of training rows for one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0xD1617]).permutation(n)


def batch_rng(seed, epoch, step):
    """The augmentation generator of one batch: a pure function of (seed, epoch, step)."""
    return np.random.default_rng([seed, epoch, step, 0xA06])


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can checkpoint first."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def progress(total, desc, leave, unit="batch"):
    """A tqdm bar on a terminal or in the notebook; nothing in a log (CI logs get one line per epoch)."""
    return console.progress_bar(total, desc, leave, unit)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    run = runs.Run(args.run or args.preset or DEFAULT_PRESET)
    if run.is_member:
        raise UserError(f"RUN={run.name} names a member of an ensemble: members are trained by their ensemble "
                        f"(`make train RUN={run.root.name}`)")
    with run.lock("train"):
        folder = run.folder
        preset, cfg = resolve_config(args, folder)
        if args.check_config:
            check_split_asked(folder, args.overrides, args.force)
        elif not args.preset and runs.run_of(folder).finished:
            note_preset_changed(folder, preset, cfg)
        if not args.check_config:
            check_val_fraction_prepared(args.overrides, cfg)
        if cfg.members > 1:
            if cfg.member_archs.strip() and cfg.arch != member_archs(cfg)[0]:  # `PRESET=overnight ARCH=lenet5`
                raise UserError(f"ARCH={cfg.arch} is not the first of MEMBER_ARCHS={cfg.member_archs}, which the "
                                f"members take in turn: give MEMBER_ARCHS= (empty) to train every member as ARCH, "
                                f"or MEMBER_ARCHS={cfg.arch},...")
            if args.check_config:
                asked = asked_val_fraction(args.overrides)
                if asked is not None and cfg.split_seed < 0:  # before prepare splits what every run shares
                    check_blendable_split(cfg, asked)
                return 0
            return train_ensemble(folder, preset, cfg, args.force)
        if (folder / "members").is_dir():  # never a single net into an ensemble's folder
            raise UserError(single_net_in_an_ensemble(folder))
        if cfg.member_archs.strip():
            raise UserError(f"MEMBER_ARCHS={cfg.member_archs} gives the members of an ensemble their architectures: "
                            f"it needs MEMBERS of 2 or more; a single net takes ARCH= with MEMBER_ARCHS= (empty)")
        return 0 if args.check_config else train_one(folder, preset, cfg, args.force)


def note_preset_changed(folder, preset, cfg):
    """A finished run resumed without PRESET= keeps its own config and trains nothing: say so when its preset's
    file was edited since the run started and now differs from the run's config (an edit of
    configs/standard.toml would otherwise seem trained by `make train submit`). Settings the run was started with
    differ from the file too, so a file older than the run says nothing."""
    path = paths.configs() / f"{preset}.toml"
    try:
        if path.stat().st_mtime <= (folder / "config.toml").stat().st_mtime:
            return
        now = build_config(preset).to_dict()
    except (OSError, UserError):  # the preset's file is gone or broken: nothing to compare
        return
    changed = runs.config_changes(now, cfg.to_dict())
    if changed:
        print(f"note: configs/{preset}.toml was edited since runs/{folder.name} started, and differs from its config "
              f"in {', '.join(changed)}; the run keeps its own: `make train PRESET={preset} RUN=NEW` trains the "
              f"preset as it is now")


def started_split(folder):
    """[split seed, val fraction] of the prepared split the run (or its first member with a checkpoint) began
    on, as its checkpoint recorded it; None when none says."""
    for ckpt in [folder / "checkpoints", *sorted((folder / "members").glob("*/checkpoints"))]:
        arrays = checkpoint.load_newest(ckpt) if ckpt.is_dir() else None
        split = checkpoint.unpack(arrays)[3].get("data", {}).get("split") if arrays is not None else None
        if isinstance(split, list) and len(split) == 2:
            return split
    return None


def asked_val_fraction(overrides):
    """The VAL_FRACTION given among the KEY=value overrides (the last one, as typed), or None."""
    asked = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].upper() == "VAL_FRACTION"]
    return asked[-1] if asked else None


def check_val_fraction_prepared(overrides, cfg):
    """VAL_FRACTION=... given to train, which holds out the split prepare made (SPLIT_SEED unset): make prepares
    it first; `python -m pipeline.train VAL_FRACTION=0.5` trained on the prepared 0.1 and recorded 0.5."""
    given = asked_val_fraction(overrides)
    prepared = dataset.load_meta().get("val_fraction") if given is not None and cfg.split_seed < 0 else None
    # the value typed, not cfg's: a resumed run's cfg is its record (the split it began on), checked elsewhere
    if isinstance(prepared, float) and float(given) != prepared:
        raise UserError(f"VAL_FRACTION={given}: training holds out the split prepare made, VAL_FRACTION="
                        f"{prepared}; `make train VAL_FRACTION={given} ...` splits the data again first (or "
                        f"`python -m pipeline.prepare --val-fraction {given}`)")


def check_split_asked(folder, overrides, force):
    """`make train VAL_FRACTION=... RUN=x` asks prepare to split the shared data again for x, before x trains:
    refused (unless FORCE=1) when x began on another split, which it would then refuse to continue on."""
    asked = asked_val_fraction(overrides)
    split = started_split(folder) if asked is not None and not force else None
    if split and isinstance(split[1], float) and float(asked) != split[1]:
        raise UserError(f"runs/{folder.name} began on the split VAL_FRACTION={split[1]} (split seed {split[0]}), "
                        f"so VAL_FRACTION={asked} would split the data again under it: give VAL_FRACTION="
                        f"{split[1]} or none, train the new split under another RUN=, or FORCE=1 to continue on it")


def member_config(cfg, k):
    """Member k of an ensemble: its own seed (weights, data order, dropout, augmentation and, with BAG < 1, its
    bag of the training rows), and the ensemble's split, so that every member holds out the same validation rows
    and blends are compared like for like (pipeline.ensemble). Deep ensembles gain their diversity from the
    seed (Lakshminarayanan et al. 2017); Deotte's also from bags (docs/EXPERIMENTS.md, E10)."""
    archs = member_archs(cfg)
    return dataclasses.replace(cfg, members=1, seed=cfg.seed + k, arch=archs[k % len(archs)], member_archs="")


def member_archs(cfg):
    """The architectures an ensemble's members take in turn (MEMBER_ARCHS), or [ARCH]."""
    return [name.strip() for name in cfg.member_archs.split(",")] if cfg.member_archs.strip() else [cfg.arch]


def single_net_in_an_ensemble(folder):
    """What to say when a run with members/ resolves to MEMBERS=1: its config.toml was removed (as the message
    for a damaged one advises), or MEMBERS=1 was asked for."""
    if (folder / "config.toml").is_file():
        return (f"runs/{folder.name} is an ensemble (it has members/): MEMBERS=1 would train a single net into it; "
                f"keep its MEMBERS, or train the single net under another RUN=")
    try:
        preset = load_toml(folder / "members" / "0" / "config.toml").get("preset", "<its preset>")
    except UserError:
        preset = "<its preset>"
    return (f"runs/{folder.name} holds the members of an ensemble but no config of its own: give its preset "
            f"(`make train PRESET={preset} RUN={folder.name}`); the configs its members were trained with are "
            f"checked against it")


def check_members(folder, cfg, force):
    """An ensemble without a record of its config (started before ensembles kept one, or the record removed with
    config.toml): each member it has begun must have been trained with the config it derives now, unless FORCE=1
    says otherwise. A finished member is never trained again, so this is the only place its config is read."""
    root = folder / "members"
    ks = sorted(int(p.name) for p in root.iterdir()
                if p.is_dir() and p.name.isascii() and p.name.isdigit()) if root.is_dir() else []
    for k in ks:
        changed = member_changes(root / str(k), member_config(cfg, k), force)
        if changed and not force:
            hint = " (MEMBER_ARCHS= trains every member as ARCH, as ensembles started before MEMBER_ARCHS did)" \
                if len(changed) == 1 and changed[0].startswith("arch ") and cfg.member_archs.strip() else ""
            raise UserError(f"runs/{folder.name}/members/{k} was trained with another config ({', '.join(changed)}), "
                            f"and the ensemble keeps no record of its own: give the settings it was trained with"
                            f"{hint}, or FORCE=1 to train the members still unfinished with these")


def train_ensemble(folder, preset, cfg, force):
    """Train the members one after another under runs/NAME/members/K/; each resumes as a single run does."""
    if cfg.members < 1:
        raise UserError(f"MEMBERS must be at least 1, got {cfg.members}")
    seconds = parse_duration(cfg.max_time)  # 0 (or empty): no limit, as for a single net
    deadline = time.monotonic() + seconds if seconds else None
    if ensemble_record(folder) is None:
        check_members(folder, cfg, force)
    members = [runs.run_of(folder / "members" / str(k)) for k in range(cfg.members)]
    finished = [m for m in members if m.finished]
    if len(finished) < len(members):  # what the members still to train would meet, before the config is recorded
        # (a refused MEMBERS=N leaves no trace; a finished ensemble, even on a machine without its GPU, says
        # "nothing to do")
        check_members_train_csv(folder, finished)
        check_members_split(folder, cfg, force)
        check_blendable_split(cfg)
        check_buildable(cfg)
    new = not (folder / "config.toml").is_file()
    folder.mkdir(parents=True, exist_ok=True)
    record_ensemble_config(folder, preset, cfg)
    try:
        return train_members(folder, preset, cfg, force, deadline)
    except BaseException:
        if new and not (folder / "members").exists():  # refused before a member began (a typo in ARCH=...):
            for name in ("config.toml", ENSEMBLE_RECORD):  # no config left behind to refuse the retry with
                (folder / name).unlink(missing_ok=True)
        raise


def check_buildable(cfg):
    """What a member would refuse only after its ensemble recorded the config (a device this machine lacks, an
    unknown ARCH, an optimizer or schedule that cannot take these settings): refused before anything is written,
    since the recorded config is what every later `make train RUN=...` continues with."""
    select_device(cfg.device)
    for arch in member_archs(cfg):
        build_model(arch, seed=cfg.seed, dtype=np.float32)
    make_optimizer(cfg.optimizer, momentum=cfg.momentum, nesterov=cfg.nesterov,
                   weight_decay=cfg.weight_decay, l1=cfg.l1, l2=cfg.l2)
    make_schedule(cfg.schedule, cfg.lr, cfg.epochs, 1, lr_decay=cfg.lr_decay, step_epochs=cfg.step_epochs,
                  warmup_epochs=cfg.warmup_epochs)


def check_members_train_csv(folder, finished):
    """Members still to train would learn the train.csv prepared now; a finished member (of `finished`) that
    learnt another one could not be blended with them (pipeline.ensemble refuses it), so the ensemble is refused
    before hours of training rather than after."""
    now = dataset.load_meta().get("train_sha256")
    other = [m.name.rsplit("/", 1)[-1] for m in finished if now and m.summary().get("train_sha256") not in (None, now)]
    if other:
        raise UserError(f"runs/{folder.name}/members/{', '.join(other)} learnt another train.csv than the one "
                        f"prepared now, and an ensemble blends members of one train.csv: prepare the one they "
                        f"learnt again to continue, or train on this one under a new RUN= (FORCE=1 does not "
                        f"apply: the blend would refuse them)")


def check_members_split(folder, cfg, force):
    """Members still to train would hold out the validation rows of the split prepared now; the ensemble's members
    began on the split their checkpoints record, and blends are judged on the rows every member held out. A
    prepare in between (`make train VAL_FRACTION=... RUN=other`) trained the next member on another split without
    a word. FORCE=1 continues on another VAL_FRACTION of the same split seed (the smaller fraction's validation
    rows lie within the larger's, so every member holds them out), never on another split seed (too few rows
    held out by all to blend them)."""
    started, now = started_split(folder), training_data(cfg)
    if started is None or started == now["split"]:
        return
    same_seed = started[0] == now["split"][0]
    if force and same_seed:
        print(f"FORCE: the members still to train hold out the split of now (VAL_FRACTION={now['split'][1]}); "
              f"the blend judges every member on the rows all of them held out", file=sys.stderr)
        return
    advice = restore_advice({"train_sha256": now["train_sha256"], "split": started}, now)
    raise UserError(f"runs/{folder.name}'s members began on another validation split (split seed {started[0]}, "
                    f"VAL_FRACTION={started[1]}) than the one prepared now (split seed {now['split'][0]}, "
                    f"VAL_FRACTION={now['split'][1]}), and the blend judges members on the rows all of them held "
                    f"out: {advice}train on this one under a new RUN="
                    + (", or FORCE=1 to continue on it" if same_seed else
                       " (FORCE=1 does not apply: members of two split seeds share too few held-out rows)"))


def check_blendable_split(cfg, asked=None):
    """An ensemble's blend is chosen on its validation rows: a prepared split of fewer rows than it needs
    (`VAL_FRACTION=0.0003`) trained every member, then the blend refused them all. asked: the VAL_FRACTION
    `make train` asks prepare for (checked before it splits the data every run shares, from the class counts
    of meta.json: a stratified split's size does not depend on its seed)."""
    from pipeline.ensemble import MIN_SHARED_ROWS

    if asked is not None:
        counts = dataset.load_meta().get("class_counts")
        if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
            return  # an old or odd meta.json: checked again once prepared
        n_val = len(dataset.stratified_split(np.repeat(np.arange(len(counts)), counts), float(asked), 0)[1])
    elif cfg.split_seed < 0:
        n_val = len(dataset.load_split()[1])
    else:
        return  # its own split (SPLIT_SEED): the blend says so if it is too small
    if n_val < MIN_SHARED_ROWS:
        raise UserError(f"the {'asked' if asked is not None else 'prepared'} validation split holds {n_val} rows, "
                        f"and an ensemble's blend is chosen on at least {MIN_SHARED_ROWS}: prepare a larger "
                        f"VAL_FRACTION (`make train VAL_FRACTION=0.1 ...` splits the data again first)")


def train_members(folder, preset, cfg, force, deadline):
    for k in range(cfg.members):
        mcfg = member_config(cfg, k)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"{console.MAX_TIME_REACHED} before member {k}; {console.next_step('continue', run=folder.name)}",
                      file=sys.stderr)
                return 3
            mcfg.max_time = f"{math.ceil(left)}s"  # at least 1 s: "0s" would read as no limit
        print(f"== member {k + 1}/{cfg.members} (seed {mcfg.seed})")
        code = train_one(folder / "members" / str(k), preset, mcfg, force, label=f"{folder.name}/members/{k}")
        if code:
            return code
    members = [runs.load_summary(folder / "members" / str(k)) for k in range(cfg.members)]
    write_json(folder / "summary.json", {
        "arch": "+".join(dict.fromkeys(m.get("arch", cfg.arch) for m in members)),  # what the members trained as
        "ensemble": True, "members": cfg.members, "finished": True,
        "data_fingerprint": runs.data_fingerprint(),
        "best_val_acc": max(m["best_val_acc"] for m in members),
        "member_val_acc": [m["best_val_acc"] for m in members],
        "wall_time_s": sum(m["wall_time_s"] for m in members),
    })
    print(f"runs/{folder.name}: {cfg.members} members trained; {console.next_step('blend', run=folder.name)}")
    return 0


def resume_threads(label, threads):
    """Resume with the engine threads the run started with: how the engine splits a batch or a sum over its
    threads decides the last bits of the weights, so only the same count ends with the very weights of an
    uninterrupted run (on a machine with other CPUs, e.g. a Kaggle kernel continuing a local run).
    PIPELINE_NN_THREADS set to another count wins, with a warning."""
    if not threads or threads == num_threads():
        return
    if os.environ.get("PIPELINE_NN_THREADS", "").strip():
        warnings.warn(f"runs/{label} started with {threads} engine threads and PIPELINE_NN_THREADS asks for "
                      f"{num_threads()}: it continues, but its weights will differ in their last bits from those "
                      f"of an uninterrupted run", stacklevel=2)
        return
    configure_threads(threads)
    print(f"using the {threads} engine threads runs/{label} started with, so that it ends with the same weights")


def train_one(folder, preset, cfg, force, label=None):
    """Train (or resume) one net in `folder`. A new one refused before its first checkpoint (the engine's error
    at the first step, say) leaves no config.toml behind to refuse the corrected retry as "another config"."""
    fresh = not (folder / "config.toml").exists() and not (folder / "checkpoints").exists()
    try:
        return _train_one(folder, preset, cfg, force, label)
    except BaseException:
        if fresh and not (folder / "checkpoints").exists():
            (folder / "config.toml").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # a member's folder, when nothing else is in it (a run's holds its lock)
                if folder.parent.name == "members":  # an ensemble's first member: its record goes too
                    folder.parent.rmdir()
        raise


def _train_one(folder, preset, cfg, force, label=None):
    """Train (or resume) one net into `folder`; returns the process exit code."""
    label = label or folder.name
    run = runs.Run(label)
    max_time = parse_duration(cfg.max_time)
    if run.finished:
        print(f"runs/{label} has finished training; nothing to do")
        return 0
    if run.is_member and (folder / "config.toml").is_file():
        check_member_config(folder, cfg, force)

    xp = select_device(cfg.device)
    device = "cpu" if xp is np else "gpu"
    configure_threads()  # the engine's threads, NumPy's BLAS held to one: before the first GEMM
    x_tr, y_tr, x_val, y_val, val_idx = load_data(cfg, xp)
    n_train = len(y_tr)
    steps_per_epoch = batches_per_epoch(n_train, cfg.batch_size)
    model = build_model(cfg.arch, seed=cfg.seed, dtype=np.float32, xp=xp)
    opt = make_optimizer(cfg.optimizer, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         weight_decay=cfg.weight_decay, l1=cfg.l1, l2=cfg.l2)
    schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs, steps_per_epoch, lr_decay=cfg.lr_decay,
                             step_epochs=cfg.step_epochs, warmup_epochs=cfg.warmup_epochs)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    calibration = x_tr[xp.asarray(np.random.default_rng([cfg.seed, 0xB7]).permutation(n_train)[:CALIBRATION_ROWS])] \
        if average else None

    ckpt_dir = folder / "checkpoints"
    state = {"epoch": 0, "step": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0,
             "history": [], "wall_time_s": 0.0, "done": False,
             "epoch_sums": {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}}
    arrays = checkpoint.load_newest(ckpt_dir)
    if arrays is not None:
        model_state, opt_state, rng_state, state = checkpoint.unpack(arrays)
        odd = [key for key, kind in RESUMED_STATE.items() if not isinstance(state.get(key), kind)
               or key == "epoch_sums" and not {"loss", "correct", "seen", "seconds"} <= state[key].keys()]
        if odd:
            raise UserError(f"the checkpoint in {ckpt_dir} lacks its training state ({', '.join(odd)}); remove "
                            f"{ckpt_dir} to train runs/{label} afresh")
        try:
            model.load_state_dict(model_state)
            made_with = state.get("config")  # None in checkpoints from before the record: taken as they are
            if made_with and "optimizer" in runs.config_changes(made_with, cfg.to_dict()):  # FORCE=1 adopted it
                print(f"FORCE: the optimizer is now {cfg.optimizer}: its state starts afresh", file=sys.stderr)
            else:
                opt.load_state_dict(opt_state, model.params())
            model.set_rng_state(rng_state)
            if average and checkpoint.average_part(arrays):
                average.load_state_dict(checkpoint.average_part(arrays))
            elif average:  # EMA_DECAY switched on (FORCE=1) in a started run: the average starts here
                average = WeightAverage(model, cfg.ema_decay)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"the checkpoint in {ckpt_dir} does not fit {cfg.arch} ({exc}); remove {ckpt_dir} "
                            f"to train runs/{label} afresh") from None
        data = training_data(cfg)
        if state.get("data", data) != data:  # checkpoints made before the record was kept are taken as they are
            if not force:
                raise UserError(f"runs/{label} was started on other training data (train.csv or the validation split "
                                f"changed since: `make prepare` ran again), so its validation rows would include "
                                f"rows it trained on: {restore_advice(state['data'], data)}train it afresh under "
                                f"another RUN=, or FORCE=1 to continue on the data of now")
            print(f"FORCE: continuing runs/{label} on the training data of now", file=sys.stderr)
        state["data"] = data
        print(f"resuming runs/{label} at epoch {state['epoch'] + 1}, step {state['step']}/{steps_per_epoch}")
        if state.get("device", device) != device:  # e.g. a kernel continuing a CPU run with GPU=1
            warnings.warn(f"runs/{label} began on {state['device'].upper()} and continues on {device.upper()}: its "
                          f"weights will differ from those of an uninterrupted run (DEVICE={state['device']} keeps "
                          f"them)", stacklevel=2)
        if xp is np:
            resume_threads(label, state.get("threads"))
    else:
        state["data"] = training_data(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "config.toml", to_toml({"preset": preset, **cfg.to_dict()}))
        print(f"training runs/{label}: {cfg.arch}, {cfg.epochs} epochs, {n_train} train / {len(y_val)} "
              f"validation images, on {'GPU' if xp is not np else 'CPU'}")
    state.setdefault("device", device)  # where it began (a checkpoint from before the record: where it is now)
    before = state.get("config") or {}
    adopted = arrays is not None and not runs.same_config(before, cfg)  # FORCE=1 changed it
    rejudged = adopted and before.get("early_stop_metric", cfg.early_stop_metric) != cfg.early_stop_metric
    if rejudged:  # the best score so far is of the other metric: no later epoch could be compared with it
        state["best_score"], state["bad_epochs"] = None, 0
    state["config"] = {"preset": preset, **cfg.to_dict()}  # the checkpoint carries the config it was made with
    if xp is np:
        state.setdefault("threads", num_threads())  # the engine's split of the work, which its last bits follow

    def save(kind="latest", delivered=None):
        packed = checkpoint.pack(delivered or model.state_dict(), opt.state_dict(), model.get_rng_state(), state,
                                 average.state_dict() if average else None)
        try:
            if kind == "best":
                checkpoint.write_best(ckpt_dir, packed)
            else:
                checkpoint.write_latest(ckpt_dir, packed)
        except OSError as exc:
            kept = "the previous checkpoint is kept" if any((ckpt_dir / name).is_file() for name in (
                checkpoint.LATEST, checkpoint.PREVIOUS)) else "no checkpoint was written yet"
            raise UserError(f"cannot write a checkpoint in {ckpt_dir}: {exc.strerror}; {kept}: make room, then "
                            f"{console.next_step('continue', run=run.root.name)}") from None

    if force:
        if adopted:  # the checkpoints say so before config.toml does: a kill between them is no "edit" to refuse
            if not rejudged:  # the best epoch so far stays the best (rejudged: the next epoch's is)
                checkpoint.restamp_best(ckpt_dir, state["config"])
            save()
        write_text(folder / "config.toml", to_toml(state["config"]))

    started = time.monotonic()
    wall_before = state["wall_time_s"]
    last_save = time.monotonic()
    epoch_bar = progress(cfg.epochs, "epochs", leave=True, unit="epoch")
    epoch_bar.update(state["epoch"])
    with StopSignal() as stop:
        while state["epoch"] < cfg.epochs and not state["done"]:
            epoch = state["epoch"]
            order = epoch_order(cfg.seed, epoch, n_train)
            sums = state["epoch_sums"]  # the epoch's running totals survive a mid-epoch resume
            t_epoch = time.monotonic() - sums["seconds"]
            bar = progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            bar.update(state["step"])
            while state["step"] < steps_per_epoch:
                step = state["step"]
                rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size if step + 1 < steps_per_epoch else None]
                xb, yb = x_tr[xp.asarray(rows)], y_tr[rows]
                if cfg.augment:
                    xb = random_affine(xb, batch_rng(cfg.seed, epoch, step), cfg.rotate_deg, cfg.zoom, cfg.shift,
                                       cfg.zoom_xy, cfg.elastic)
                lr = schedule(epoch * steps_per_epoch + step)
                logits = model.forward(xb, train=True)
                loss, dlogits = softmax_cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing, as_float=False)
                model.backward(dlogits, input_grad=False)
                opt.step(model.params(), lr)
                if average:
                    average.update(model)
                state["step"] += 1
                loss, correct = step_totals(loss, logits, yb)  # the step's one host sync on a GPU
                sums["loss"] += loss * len(rows)
                sums["correct"] += correct
                sums["seen"] += len(rows)
                sums["seconds"] = time.monotonic() - t_epoch
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}", acc=f"{sums['correct'] / sums['seen']:.4f}",
                                img_s=f"{sums['seen'] / max(sums['seconds'], 1e-9):.0f}", refresh=False)
                bar.update(1)
                state["wall_time_s"] = wall_before + time.monotonic() - started
                out_of_time = max_time and time.monotonic() - started >= max_time  # per invocation: one night each
                due = (step + 1) % cfg.ckpt_every == 0 if cfg.ckpt_every > 0 else \
                    time.monotonic() - last_save >= CKPT_SECONDS
                if stop.signum or out_of_time or (due and state["step"] < steps_per_epoch):
                    save()
                    last_save = time.monotonic()
                if stop.signum:
                    bar.close()
                    print(f"\nstopped by signal {stop.signum}: checkpoint saved at epoch {epoch + 1}, step "
                          f"{state['step']}; {console.next_step('continue', run=run.root.name)}", file=sys.stderr)
                    return 128 + stop.signum
                if out_of_time:
                    bar.close()
                    print(f"{console.MAX_TIME_REACHED}: checkpoint saved at epoch {epoch + 1}, step {state['step']}; "
                          f"{console.next_step('continue', run=run.root.name)}", file=sys.stderr)
                    return 3
            bar.close()

            # End of epoch: validation, history, best, early stopping, checkpoint.
            # With a weight average, the average is what the run delivers and what validation judges.
            val_loss, val_acc, _ = evaluate(model, x_val, y_val)
            live = {}
            delivered = None
            if average:
                live = {"live_val_loss": val_loss, "live_val_acc": val_acc}
                with average.applied(model, calibration) as delivered:
                    val_loss, val_acc, _ = evaluate(model, x_val, y_val)
            seen = max(sums["seen"], 1)
            lr = schedule(epoch * steps_per_epoch + steps_per_epoch - 1)
            record = {"epoch": epoch + 1, "train_loss": sums["loss"] / seen, "train_acc": sums["correct"] / seen,
                      "val_loss": val_loss, "val_acc": val_acc, **live, "lr": lr,
                      "images_per_s": sums["seen"] / max(sums["seconds"], 1e-9),
                      "wall_time_s": wall_before + time.monotonic() - started}
            state["history"].append(record)
            score = val_acc if cfg.early_stop_metric == "val_acc" else -val_loss
            better = state["best_score"] is None or score > state["best_score"]
            if better:
                state["best_score"], state["bad_epochs"] = score, 0
            else:
                state["bad_epochs"] += 1
            improved = better or cfg.select == "last"  # this epoch's weights become the delivered ones
            if improved:
                state["best_epoch"] = epoch + 1
            if cfg.early_stop_patience and state["bad_epochs"] >= cfg.early_stop_patience:
                state["done"] = True
            state["epoch"], state["step"] = epoch + 1, 0
            state["epoch_sums"] = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            state["wall_time_s"] = record["wall_time_s"]
            write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
            if improved:
                save("best", delivered)
            save()
            last_save = time.monotonic()
            epoch_bar.update(1)
            line = (f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  acc {record['train_acc']:.4f}  "
                    f"val_loss {val_loss:.4f}  val_acc {val_acc:.4f}  lr {lr:.2e}  {record['images_per_s']:.0f} img/s")
            epoch_bar.write(line) if not epoch_bar.disable else print(line, flush=True)
            if state["done"]:
                print(f"early stop: no improvement in {cfg.early_stop_patience} epochs")
    epoch_bar.close()
    if stop.signum:  # it came while the last epoch was judged: that epoch is saved; an ensemble stops here too
        print(f"stopped by signal {stop.signum}: checkpoint saved after the last epoch; "
              f"{console.next_step('continue', run=run.root.name)}", file=sys.stderr)
        return 128 + stop.signum

    def last_weights():  # what the last epoch delivers: the average when the run keeps one
        return average.averaged_state(model, calibration) if average else model.state_dict()

    finish(folder, label, cfg, model, ckpt_dir, x_val, y_val, val_idx, state, last_weights)
    return 0


def member_changes(folder, wanted, force):
    """How the config a member was trained with (checked against its checkpoint) differs from `wanted`, the one
    its ensemble derives for it now, RUN_CONTROL aside: ["lr 0.004 -> 0.5", ...]; [] for a member not begun."""
    saved = recorded_config(folder, force)[1]
    saved.pop("preset", None)
    if not saved:
        return []
    trained = apply_values(TrainConfig(), saved, source=str(folder / "config.toml"))
    return [f"{key} {getattr(trained, key)!r} -> {getattr(wanted, key)!r}"  # as runs compare: val_fraction too
            for key in runs.config_changes(trained.to_dict(), wanted.to_dict())]


def check_member_config(folder, cfg, force):
    """A member's saved config must be the one its ensemble derives now (the ensemble's own was checked)."""
    if member_changes(folder, cfg, force) and not force:
        raise UserError(f"{folder} was trained with another config; FORCE=1 continues with the new one")


def load_delivered(model, ckpt_dir, cfg, last_weights):
    """Load the weights a run delivers into `model`: best.npz (the best epoch, or the last with SELECT=last);
    without one, or with a damaged or foreign one (reported in one line), last_weights() (the weight average
    when the run keeps one). Returns best.npz's epoch, or None when last_weights() stood in."""
    best_path = ckpt_dir / checkpoint.BEST
    if best_path.exists():
        try:
            model_state, _, _, best_state = checkpoint.unpack(checkpoint.read(best_path))
            if best_state.get("config") and not runs.same_config(best_state["config"], cfg):
                raise checkpoint.CorruptCheckpoint(f"{best_path}: made with another config")
            model.load_state_dict(model_state)
            return best_state.get("best_epoch")
        except (checkpoint.CorruptCheckpoint, ValueError, KeyError) as exc:
            warnings.warn(f"{exc}; delivering the last epoch's weights instead", stacklevel=2)
    model.load_state_dict(last_weights())
    return None


def finish(folder, label, cfg, model, ckpt_dir, x_val, y_val, val_idx, state, last_weights):
    """Deliver the best-by-validation weights: val predictions, model.npz, then summary.json (the Makefile's target).

    A damaged or foreign best.npz is reported in one line and the last epoch's weights are delivered instead.
    """
    best_epoch = load_delivered(model, ckpt_dir, cfg, last_weights) or len(state["history"])
    val_loss, val_acc, probs = evaluate(model, x_val, y_val)
    history = state["history"]
    write_text(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    write_text(folder / "config.toml", to_toml(state.get("config") or cfg.to_dict()))
    save_npz(folder / "val_predictions.npz", {"idx": val_idx, "y": to_numpy(y_val), "probs": probs.astype(np.float32)})
    save_npz(folder / "model.npz", model.state_dict())
    write_json(folder / "summary.json", {
        "arch": cfg.arch, "best_val_acc": val_acc, "best_val_loss": val_loss, "best_epoch": best_epoch,
        "epochs_done": len(history), "wall_time_s": state["wall_time_s"], "finished": True,
        "select": cfg.select, "weight_average": bool(cfg.ema_decay),
        "data_fingerprint": runs.data_fingerprint(),
        "train_sha256": state["data"].get("train_sha256"),  # the train.csv its validation rows index (report)
        "train_images_per_s": float(np.median([r["images_per_s"] for r in history])) if history else None,
    })
    print(f"runs/{label}: {'last' if cfg.select == 'last' else 'best'} epoch {best_epoch}"
          f"{' (weight average)' if cfg.ema_decay else ''}, val_acc {val_acc:.4f}, "
          f"{state['wall_time_s'] / 60:.1f} min of training -> runs/{label}/model.npz")
    if not val_acc >= runs.CHANCE_LEVEL:  # NaN too
        warnings.warn(f"runs/{label} did not learn: validation accuracy {val_acc:.4f} is near chance (0.10 for ten "
                      f"digits); the loss may have diverged (a smaller LR) or the labels may not match the images",
                      stacklevel=2)


if __name__ == "__main__":
    sys.exit(main())
