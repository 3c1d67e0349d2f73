"""Run configuration: frozen dataclasses, TOML presets, `--set` overrides, validation, digest.

A config is four sections (`model`, `data`, `optim`, `train`) plus `comm`, each a frozen dataclass
whose fields carry a comment saying what they mean. Presets live in `configs/<name>.toml` and only
list what differs from these defaults; `--set section.key=value` overrides any field. Every error
names the key and the offending value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names both."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "alexnet2012"  # preset the model comes from (recorded, not interpreted)
    devices: int = 2  # devices the topology is split over: 2 = the 2012 split, 1 = one device
    input_size: int = 227  # side of the square network input (227 for the paper geometry)
    num_classes: int = 1000  # fc8 width
    # total output channels of conv1..conv5, fc6, fc7 (fc8 = num_classes); each split over devices
    channels: tuple[int, ...] = (96, 256, 384, 384, 256, 4096, 4096)
    fc8: str = "split"  # "split": 500/500 over the devices; "device0": all of fc8 on device 0
    lrn_size: int = 5  # n: channels in the LRN window
    lrn_k: float = 2.0  # k: additive constant of the LRN denominator
    lrn_alpha: float = 1e-4  # alpha of the LRN denominator
    lrn_beta: float = 0.75  # beta: exponent of the LRN denominator
    lrn_alpha_over_n: bool = False  # divide alpha by n (cuda-convnet2, Caffe) or not (paper)
    lrn_scope: str = "device"  # "device": window stays in each device's channels; "all": across all
    lrn_place: str = "before_pool"  # "before_pool" (paper: ReLU, LRN, pool) or "after_pool" (seed)
    dropout: float = 0.5  # drop probability after fc6 and fc7 (0 disables dropout)
    dropout_inverted: bool = False  # scale by 1/(1-p) in training instead of by (1-p) at test
    init_std: float = 0.01  # std of the N(0, std^2) weight init of every layer
    init_std_fc67: float = 0.01  # std for fc6 and fc7 (Caffe uses 0.005)
    bias_init: float = 1.0  # bias of conv2, conv4, conv5, fc6, fc7 (the others start at 0)
    dtype: str = "float32"  # "float32" for work, "float64" for exact equivalence checks


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 256  # stored image side: shorter side resized to it, centre crop
    random_crop: bool = True  # train on random input_size crops (else the centre crop)
    flip: bool = True  # random horizontal flips in training
    color_noise: float = 0.1  # std of the "fancy PCA" alpha (0 disables the colour noise)
    mean_subtract: bool = True  # subtract the training set's mean image
    synthetic_classes: int = 10  # classes of the embedded synthetic dataset
    synthetic_train: int = 1280  # training images of the embedded synthetic dataset
    synthetic_val: int = 256  # validation images of the embedded synthetic dataset
    prefetch: int = 2  # batches prepared ahead in the background on the coordinator
    workers: int = 0  # decode processes for `prepare` and raw folders (0 = one per core)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # momentum of the paper's update rule
    weight_decay: float = 0.0005  # L2 weight decay, applied to weights
    decay_biases: bool = False  # also apply weight decay to biases
    bias_lr_mult: float = 1.0  # biases learn at lr * bias_lr_mult (Caffe and cuda-convnet2: 2)
    schedule: str = "plateau"  # "constant", "plateau", "step" or "exp_steps"
    plateau_patience: int = 1  # validations without improvement before dividing the lr
    plateau_factor: float = 0.1  # lr multiplier at each plateau (and each step)
    plateau_max_drops: int = 3  # at most this many plateau drops
    plateau_threshold: float = 0.0  # an improvement must exceed this (absolute error)
    step_every: int = 100_000  # "step" schedule: multiply by plateau_factor every so many steps
    exp_target_factor: float = 250.0  # "exp_steps": the lr falls to lr / this by the end of the run
    exp_num_steps: int = 4  # "exp_steps": number of discrete levels


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128  # images per SGD step (the whole pair's batch, not per device)
    epochs: float = 90.0  # training length in epochs when steps is 0
    steps: int = 0  # training length in steps (overrides epochs when > 0)
    demo_steps: int = 4  # steps of a run on the embedded synthetic data with no length given
    seed: int = 0  # seeds the init, the data order, augmentation and dropout
    log_every: int = 1  # steps between progress lines
    eval_every: int = 0  # steps between validations (0 = once per epoch)
    eval_batches: int = 0  # validation batches per evaluation (0 = the whole validation set)
    checkpoint_every: int = 0  # steps between periodic checkpoints (0 = only at the end)
    checkpoint_minutes: float = 0.0  # minutes between periodic checkpoints (0 = off)
    keep_last: int = 3  # periodic checkpoints kept besides checkpoint.npz
    fail_at_step: int = -1  # fault injection: raise at this step (-1 = never)
    fail_on_rank: int = 0  # fault injection: the rank that fails
    fail_mode: str = "raise"  # fault injection: "raise", "exit" (dies), "hang" or "nan" (gradient)


@dataclass(frozen=True)
class CommConfig:
    watchdog_seconds: float = 120.0  # a collective stuck this long aborts the job (0 = off)
    blas_threads: int = 0  # BLAS threads per rank (0 = cores / ranks on this host)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), the form saved to TOML."""
        return {
            f.name: {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in fields(self)
        }

    def to_toml(self) -> str:
        """The whole config as TOML text (every key, so a run directory is self-describing)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def digest(self) -> str:
        """Short hash of the config text, to tell runs apart."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:12]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


_CHOICES = {
    ("model", "fc8"): ("split", "device0"),
    ("model", "lrn_scope"): ("device", "all"),
    ("model", "lrn_place"): ("before_pool", "after_pool"),
    ("model", "dtype"): ("float32", "float64"),
    ("optim", "schedule"): ("constant", "plateau", "step", "exp_steps"),
    ("train", "fail_mode"): ("raise", "exit", "hang", "nan"),
}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default; return it in that type."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        value = tuple(value)
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return value


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a validated Config from nested dicts, starting from `base` (default: the defaults)."""
    base = base or Config()
    sections = {f.name: getattr(base, f.name) for f in fields(base)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r} "
                              f"(known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a table, got {values!r}")
        current = sections[section]
        known = {f.name: getattr(current, f.name) for f in fields(current)}
        updates = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key} (value {value!r})")
            updates[key] = _coerce(section, key, value, known[key])
        sections[section] = dataclasses.replace(current, **updates)
    config = Config(**sections)
    validate(config)
    return config


def _check(ok: bool, key: str, value: Any, must: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {must}, got {value!r}")


def validate(config: Config) -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the key and value."""
    m, d, o, t, c = config.model, config.data, config.optim, config.train, config.comm
    _check(m.devices in (1, 2), "model.devices", m.devices, "must be 1 or 2")
    _check(len(m.channels) == 7, "model.channels", m.channels,
           "must list 7 widths (conv1..conv5, fc6, fc7)")
    for i, width in enumerate(m.channels):
        _check(width > 0 and width % m.devices == 0, f"model.channels[{i}]", width,
               f"must be a positive multiple of model.devices={m.devices}")
    _check(m.num_classes > 0, "model.num_classes", m.num_classes, "must be positive")
    if m.fc8 == "split":
        _check(m.num_classes % m.devices == 0, "model.num_classes", m.num_classes,
               f"must be divisible by model.devices={m.devices} when model.fc8 = 'split'")
    _check(m.input_size >= 67 and (m.input_size - 11) % 4 == 0, "model.input_size",
           m.input_size, "must be >= 67 with (input_size - 11) divisible by 4")
    _check(m.lrn_size >= 1 and m.lrn_size % 2 == 1, "model.lrn_size", m.lrn_size,
           "must be a positive odd number")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(m.init_std > 0 and m.init_std_fc67 > 0, "model.init_std", m.init_std,
           "must be positive")
    _check(d.image_size >= m.input_size, "data.image_size", d.image_size,
           f"must be >= model.input_size={m.input_size}")
    _check(d.color_noise >= 0, "data.color_noise", d.color_noise, "must be >= 0")
    _check(d.synthetic_classes >= 2, "data.synthetic_classes", d.synthetic_classes,
           "must be >= 2")
    _check(d.synthetic_train > 0 and d.synthetic_val > 0, "data.synthetic_train",
           d.synthetic_train, "and data.synthetic_val must be positive")
    _check(d.prefetch >= 0 and d.workers >= 0, "data.prefetch", d.prefetch,
           "and data.workers must be >= 0")
    _check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(0 < o.plateau_factor < 1, "optim.plateau_factor", o.plateau_factor,
           "must be in (0, 1)")
    _check(o.plateau_patience >= 1, "optim.plateau_patience", o.plateau_patience, "must be >= 1")
    _check(o.step_every >= 1, "optim.step_every", o.step_every, "must be >= 1")
    _check(o.exp_num_steps >= 1 and o.exp_target_factor >= 1, "optim.exp_num_steps",
           o.exp_num_steps, "must be >= 1 (and optim.exp_target_factor >= 1)")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be positive")
    _check(t.steps >= 0 and t.demo_steps >= 1, "train.steps", t.steps,
           "must be >= 0 (and train.demo_steps >= 1)")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    for key in ("eval_every", "eval_batches", "checkpoint_every"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    _check(t.keep_last >= 1, "train.keep_last", t.keep_last, "must be >= 1")
    _check(c.watchdog_seconds >= 0, "comm.watchdog_seconds", c.watchdog_seconds, "must be >= 0")
    _check(c.blas_threads >= 0, "comm.blas_threads", c.blas_threads, "must be >= 0")


def preset_names() -> list[str]:
    """Names of the presets in configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(preset: str = "alexnet2012", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (a name in configs/ or a path to a TOML file) and apply `key=value` overrides.

    Args:
        preset: preset name such as "tiny", or a path to a .toml file.
        overrides: strings like "optim.lr=0.02" (the value is parsed as TOML, else taken as text).
    Returns:
        The validated Config.
    """
    path = Path(preset)
    if not (path.suffix == ".toml" and path.exists()):
        path = CONFIG_DIR / f"{preset}.toml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(preset_names())}, "
                              "or a path to a .toml file)")
    raw = _read_toml(path)
    config = from_dict(raw)
    return apply_overrides(config, overrides)


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split "section.key=value" into (section, key, parsed value)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return `config` with each "section.key=value" override applied and validated."""
    raw: dict[str, dict[str, Any]] = {}
    for item in overrides:
        section, key, value = parse_override(item)
        current = getattr(getattr(config, section, None), key, None)
        if isinstance(current, str) and not isinstance(value, str):
            value = item.split("=", 1)[1].strip()  # "mode=nan": TOML read a float, text wanted
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, base=config) if raw else config


def from_toml_text(text: str) -> Config:
    """Rebuild a Config from the TOML text saved in a run directory or checkpoint."""
    try:
        return from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"saved config is not valid TOML: {e}") from None
