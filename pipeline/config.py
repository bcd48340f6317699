"""Training configuration: a TOML preset from configs/ plus KEY=value overrides.

Overrides are type-checked against the preset's defaults and unknown keys fail loudly (nanoGPT's
rules, without its exec). Keys are case-insensitive so `make train EPOCHS=3` and `epochs=3` agree.
"""
import contextlib
import json
import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, fields

from pipeline import paths
from pipeline.errors import UserError


@dataclass
class TrainConfig:
    arch: str = "seed_small"          # a named architecture from pipeline.nn.architectures
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adam"           # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9             # sgd
    nesterov: bool = False            # sgd
    weight_decay: float = 0.0         # decoupled (sgd, adamw)
    l2: float = 0.0                   # coupled penalty: its gradient joins the loss's (the loss shown is the data's)
    l1: float = 0.0
    schedule: str = "exponential"     # constant | step | exponential | cosine | onecycle
    lr_decay: float = 0.95            # exponential: lr * lr_decay**epoch; step: factor per step_epochs
    step_epochs: int = 10             # step schedule
    warmup_epochs: float = 0.0        # cosine
    label_smoothing: float = 0.0
    ema_decay: float = 0.0            # > 0: deliver an exponential moving average of the weights
    select: str = "best"              # best: the epoch with the best validation score | last: the final epoch
    augment: bool = False
    rotate_deg: float = 10.0
    zoom: float = 0.1
    zoom_xy: bool = False             # draw x and y zoom independently (Keras' zoom_range)
    shift: float = 0.1
    elastic: float = 0.0              # > 0: also an elastic warp, at most this many pixels (pipeline/augment.py)
    seed: int = 0
    split_seed: int = -1              # -1: use the split written by prepare; else resplit train.csv
    val_fraction: float = 0.1
    bag: float = 1.0                  # < 1: train on this fraction of the training rows, a draw of its own per seed
    device: str = "auto"              # auto | cpu | gpu
    early_stop_patience: int = 0      # 0: off
    early_stop_metric: str = "val_acc"
    ckpt_every: int = 0               # steps; 0: about every 2 minutes of work
    max_time: str = ""                # e.g. 8h, 90m: stop cleanly with a checkpoint
    members: int = 1                  # ensemble members (overnight preset)
    member_archs: str = ""            # e.g. "deotte_relu_bn,deotte": member k takes the (k mod n)-th; "": all ARCH

    def to_dict(self):
        return asdict(self)


PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Read by train itself (FORCE=1), not a setting.
TRAIN_VARIABLES = {"FORCE"}


def stage_variables(makefile=None):
    """Variables the Makefile reads that are not training settings (RUN, SOURCE, PYTHON_BASE, TTA, ...).

    Derived from the Makefile itself, so a variable it gains is never refused as an unknown setting;
    where there is no Makefile (the Kaggle kernel) nobody passes make variables.
    """
    path = makefile or paths.REPO / "Makefile"
    try:
        text = path.read_text()
    except OSError:
        return set(TRAIN_VARIABLES)
    names = set(re.findall(r"\$[({]([A-Z][A-Z0-9_]*)[)}]", text))
    names |= set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:?+]?=", text, re.M))
    names |= set(re.findall(r"\$\((?:value|origin|filter [^,]*,\$\()\s*([A-Z][A-Z0-9_]*)", text))
    names |= set(re.findall(r"PIPELINE_VAR_([A-Z][A-Z0-9_]*)", text))
    settings = {f.name.upper() for f in fields(TrainConfig)}
    return (names - settings) | TRAIN_VARIABLES


def make_overrides(environ=None):
    """The KEY=value settings given on make's command line: the Makefile hands their names in PIPELINE_MAKE_VARS
    and their text, unexpanded, in PIPELINE_VAR_<NAME> (never through the shell)."""
    environ = os.environ if environ is None else environ
    names = environ.get("PIPELINE_MAKE_VARS", "").split()
    return [f"{name}={environ.get('PIPELINE_VAR_' + name, '')}" for name in names]


def preset_path(name):
    known = ", ".join(sorted(p.stem for p in paths.configs().glob("*.toml")))
    path = paths.configs() / f"{name}.toml"
    if not PRESET_NAME.fullmatch(str(name)) or not path.is_file():
        raise UserError(f"unknown preset '{name}' (known: {known})")
    return path


def load_toml(path, advice=None):
    tail = f": {advice}" if advice else ""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so not TOML{tail}") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, an integer of 4300+ digits, nesting too deep
        raise UserError(f"{path}: invalid TOML: {exc}{tail}") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}{tail}") from None


# The ranges a type cannot say: (lowest, highest, whether the highest itself is allowed); None: unbounded.
# A value outside them would crash training with a traceback or, worse, deliver a model it never trained.
MAX_MEMBERS = 1000  # 500 hours of deotte members: more is a typo (a list of a billion member runs hung)
RANGES = {
    "epochs": (1, None, True), "batch_size": (1, None, True), "lr": (0.0, None, True),
    "momentum": (0.0, 1.0, True), "weight_decay": (0.0, None, True), "l2": (0.0, None, True),
    "l1": (0.0, None, True), "lr_decay": (0.0, 1.0, True), "step_epochs": (1, None, True),
    "warmup_epochs": (0.0, 1e6, True), "label_smoothing": (0.0, 1.0, False), "rotate_deg": (0.0, 180.0, True),
    "zoom": (0.0, 1.0, False), "shift": (0.0, 1.0, False), "elastic": (0.0, 14.0, True), "seed": (0, None, True),
    "split_seed": (-1, None, True),
    "val_fraction": (0.0, 1.0, False), "early_stop_patience": (0, None, True), "ckpt_every": (0, None, True),
    "members": (1, MAX_MEMBERS, True), "ema_decay": (0.0, 1.0, False), "bag": (0.0, 1.0, True),
}
ABOVE_LOWEST = {"bag"}  # settings whose lowest value itself is refused: a fraction of nothing trains nothing
CHOICES = {"early_stop_metric": ("val_acc", "val_loss"), "select": ("best", "last")}


def check_values(cfg):
    """Refuse, in one line, a setting whose type is right but whose value no training can use."""
    for name, (low, high, high_ok) in RANGES.items():
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name.upper()}: expected a finite number, got {value}")
        above = name in ABOVE_LOWEST
        if value < low or (above and value == low) or \
                (high is not None and (value > high or (value == high and not high_ok))):
            top = "" if high is None else f", at most {high}" if high_ok else f", below {high}"
            raise UserError(f"{name.upper()}: expected a value {'above' if above else 'of at least'} {low}{top}, "
                            f"got {value}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name.upper()}: expected {' or '.join(allowed)}, got '{getattr(cfg, name)}'")
    if cfg.member_archs.strip() and not all(name.strip() for name in cfg.member_archs.split(",")):
        raise UserError(f"MEMBER_ARCHS: expected architecture names separated by commas (e.g. deotte_relu_bn,deotte), "
                        f"got '{cfg.member_archs}'")
    return cfg


def _coerce(name, default, value):
    """Convert an override string (or TOML value) to the type of the default."""
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):  # (one too large for a float is refused below)
                return float(value)
        raise UserError(f"{name}: expected {kind.__name__}, got {value!r}")
    text = value.strip()
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:  # (float() of any text never overflows: "1e999" is inf, which the range checks refuse)
        pass
    raise UserError(f"{name}: expected {kind.__name__}, got {value!r}")


def build_config(preset="quick", overrides=()):
    """Resolve a preset and `KEY=value` strings into a TrainConfig."""
    data = load_toml(preset_path(preset))
    return apply_values(TrainConfig(), data, source=f"preset {preset}", overrides=overrides)


def apply_values(cfg, data, source="config", overrides=()):
    known = {f.name: f for f in fields(cfg)}
    for key, value in data.items():
        if key not in known:
            raise UserError(f"{source}: unknown key '{key}'")
        setattr(cfg, key, _coerce(key, getattr(cfg, key), value))
    stage = stage_variables() if overrides else set()
    given = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not KEY=value")
        key, value = item.split("=", 1)
        if key in stage or key.upper() in TRAIN_VARIABLES:
            continue
        if key.upper() in stage:  # make's variables are case-sensitive: `run=x` left RUN as it was, silently
            raise UserError(f"{key}={value}: the Makefile reads {key.upper()}, in capitals; {key} is not read")
        name = key.lower()
        if name not in known:
            raise UserError(f"unknown setting '{key}' (known: {', '.join(k.upper() for k in known)})")
        if name in given and given[name][0] != key and given[name][1] != value:  # make passes them in name order
            raise UserError(f"{given[name][0]}={given[name][1]} and {key}={value} set the same setting: give it once")
        given[name] = (key, value)
        setattr(cfg, name, _coerce(key, getattr(cfg, name), value))
    return check_values(cfg)


def to_toml(d) -> str:
    """Write a flat dict (plus one level of tables) as TOML; enough for resolved configs."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML's escapes, control characters too
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {fmt(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
