"""Typed run configuration: a YAML file or a named preset first, ``key=value`` overrides second.

Every key is a field of :class:`TrainConfig` with a one-line help string; :func:`validate` checks
everything a user can get wrong before any work starts and raises :class:`ConfigError` naming the key.
The resolved config is written to ``output_dir/config.yaml`` by the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scaling_abs.errors import ConfigError
from scaling_abs.schedules import ADV_DECAY_ON, LR_RULES

PRESET_DIR = Path(__file__).parent / "presets"
STRATEGIES = ("bl", "fb", "gg", "abs", "absa")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are the embedded default: ABSA, small CNN, Fashion-MNIST, a check an epoch."""

    # what to train
    model: str = _f("cnn", "model name (see README table) or hf:<name or local path>")
    dataset: str = _f(
        "fashion_mnist",
        "fashion_mnist | cifar10 | cifar100 | svhn (train + extra) | svhn_extra (the paper's S1 set) | tinyimagenet | imagenet | hf:<name>",
    )
    data_dir: str = _f("", "data set folder; empty = the data set's default place")
    augmentation: str = _f(
        "auto", "auto (the paper's choice for the model) | none | crop_flip | resized_crop_flip"
    )
    limit_train_samples: int = _f(0, "use only this many training samples (0 = all)")
    download: bool = _f(
        False,
        "let torchvision download CIFAR/SVHN into data_dir, or datasets fetch an hf: set (needs network)",
    )
    image_column: str = _f("image", "hf: data sets: the column holding the images")
    label_column: str = _f("label", "hf: data sets: the column holding the labels (class ids or names)")
    # strategy and schedule
    strategy: str = _f("absa", "bl | fb | gg | abs | absa")
    epochs: float = _f(8.0, "training length in epochs (passes over the training samples)")
    batch_size: int = _f(128, "initial global batch size (all processes together)")
    max_batch_size: int = _f(4096, "largest global batch (B_max); FB trains at this batch")
    micro_batch_size: int = _f(512, "per-process micro-batch bound (memory); larger batches accumulate")
    lr: float = _f(0.05, "base learning rate at batch_size")
    lr_decay: float = _f(0.2, "multiplicative LR decay at each of lr_decay_epochs (0.2 = divide by 5)")
    lr_decay_epochs: list = _f([4.0, 6.0], "epochs at which the LR decays (GG grows the batch instead)")
    lr_schedule: str = _f("step", "base LR schedule: step (lr_decay at lr_decay_epochs) | poly")
    lr_poly_power: float = _f(2.0, "poly: power of (1 - epoch / lr_poly_end_epoch); 2 = quadratic")
    lr_poly_end_epoch: float = _f(0.0, "poly: epoch where the decay ends (0 = the end of training)")
    lr_final: float = _f(0.0, "poly: the LR from lr_poly_end_epoch on")
    warmup_epochs: float = _f(5.0, "FB only: linear LR warm-up length in epochs")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    grad_clip: float = _f(0.0, "max gradient norm (0 = off); explicit so DeepSpeed and plain runs agree")
    # ABS / ABSA (Algorithm 1; paper defaults)
    alpha: float = _f(2.0, "grow when the eigenvalue drops to 1/alpha of the reference")
    beta: float = _f(2.0, "batch growth factor")
    kappa: int = _f(10, "grow after this many checks without a drop")
    lr_scaling: str = _f("linear", "LR rule on growth: linear | sqrt | none")
    hessian_every: int = _f(
        0, "training samples between curvature checks (0 = one epoch, the paper's; the demo: 15000)"
    )
    hessian_samples: int = _f(512, "sample budget of one curvature check (micro-batched)")
    hessian_iters: int = _f(10, "most Hessian-vector products per check (power or Lanczos steps)")
    hessian_tol: float = _f(1e-2, "stop when the estimate changes by less than this (relative)")
    hessian_micro_batch_size: int = _f(
        0, "micro-batch of curvature checks (memory of one HVP graph); 0 = micro_batch_size"
    )
    hessian_reuse_graph: str = _f(
        "auto",
        "keep the gradient graph across power iterations: auto (one micro-batch; on CUDA, the micro-batches' graphs that fit in free memory) | true | false",
    )
    hessian_custom_rules: str = _f(
        "auto",
        "our second-order rules for convolutions, eval BatchNorm, ReLU and max pooling: auto (CPU or CUDA without autocast, CUDA bf16) | true | false",
    )
    hessian_checkpoint: bool = _f(
        False,
        "recompute the model piece by piece in each product: memory of the cuts + one piece (slower)",
    )
    hessian_solver: str = _f("power", "eigenvalue solver of a check: power (the paper's) | lanczos")
    hessian_warm_start: bool = _f(
        False, "start each check from the last check's eigenvector (+ a random part)"
    )
    hessian_block: str = _f(
        "all",
        "parameters of the Hessian: all | last:N (the last N layers with parameters, each with the "
        "normalization layers after it)",
    )
    hessian_bn_mode: str = _f(
        "eval",
        "BatchNorm during checks: eval (paper's code) | train (batch statistics; buffers restored, dropout off)",
    )
    hessian_precision: str = _f(
        "auto", "autocast of curvature checks: auto (as mixed_precision) | no (fp32) | bf16 | fp16"
    )
    adv_eps: float = _f(0.005, "FGSM step on inputs in [0, 1]")
    adv_fraction: float = _f(0.2, "ABSA: fraction gamma of each batch replaced by FGSM examples")
    adv_decay: float = _f(2.0, "ABSA: gamma is divided by this (omega) at every growth")
    adv_decay_on: str = _f(
        "growth",
        "ABSA: which growths divide gamma by omega: growth (every one) | drop (a drop's only, "
        "Algorithm 1's line 12; a growth by kappa keeps gamma)",
    )
    adv_stop_epoch: float = _f(
        -1.0,
        "ABSA: gamma is 0 from this epoch on (tau; -1 = half of training: DESIGN.md's default, the paper "
        "names tau but gives no value)",
    )
    # execution
    mixed_precision: str = _f("no", "no | bf16 | fp16 (autocast; FGSM runs under the same autocast)")
    channels_last: bool = _f(
        False,
        "train in the channels-last memory format (2-d convolutions; CPU step 0.67-0.75x, H100 0.88x)",
    )
    cpu_malloc: bool = _f(
        True,
        "CPU runs with glibc: reuse large freed blocks instead of mapping them afresh (no page faults on"
        " every large tensor; freed memory stays with the process)",
    )
    deepspeed: str = _f("", "path to a DeepSpeed JSON config (ds_configs/zero2.json); empty = off")
    seed: int = _f(0, "seed of the model init, data order and curvature probes (in [0, 2**32))")
    output_dir: str = _f("runs/default", "where metrics, checkpoints and the final model go")
    resume: str = _f(
        "",
        "auto (newest checkpoint in output_dir; fresh when it has none) | a checkpoint folder | empty = fresh",
    )
    checkpoint_every: int = _f(0, "optimizer steps between checkpoints (0 = at every epoch end)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    eval_every: float = _f(1.0, "epochs between test evaluations")
    num_workers: int = _f(0, "data loader worker processes")
    progress: bool = _f(True, "show a tqdm progress bar on the main process")
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # resolved values ------------------------------------------------------------------
    @property
    def resolved_lr_poly(self) -> tuple[float, float, float] | None:
        """(end epoch, power, final factor) of the polynomial schedule, None for step decays."""
        if self.lr_schedule != "poly":
            return None
        return (self.lr_poly_end_epoch or self.epochs, self.lr_poly_power, self.lr_final / self.lr)

    @property
    def resolved_adv_stop_epoch(self) -> float:
        """tau: -1 is half of training (DESIGN.md's default; the paper names tau, Algorithm 1's
        line 21, but gives no value)."""
        return self.epochs / 2 if self.adv_stop_epoch < 0 else self.adv_stop_epoch


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


# The words a string key's YAML bool stands for: `mixed_precision: no` (Accelerate's spelling) is False.
_BOOL_WORDS = {"mixed_precision": ("no", "true"), "hessian_precision": ("no", "true")}


def _number(value: Any) -> Any:
    """A number written as text becomes one: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(key: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    kind = _TYPES[key]
    if isinstance(kind, types.GenericAlias) or kind is list:
        if value is None or value == "":
            return []
        value = [_number(v) for v in value] if isinstance(value, list) else _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key}: expected a list of numbers like [30, 60], got {value!r}")
        return [float(v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        value = _number(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads unquoted true/false/yes/no as bools
            return _BOOL_WORDS.get(key, ("false", "true"))[value]
        return str(value)
    raise AssertionError(f"unhandled config type {kind} for {key}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.is_file() and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"  # a folder named like a preset does not hide it
    if not path.is_file():
        what = "is a folder, not a file," if path.is_dir() else "names no file"
        raise ConfigError(f"config: {source!r} {what} and no preset (presets: {', '.join(list_presets())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path} as UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of key: value")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                f"config: {path}: {key!r} is not a key name (see `scaling-abs train --help-keys`)"
            )
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "lr_decay_epochs=[30,60]"]`` -> ``{"lr": 0.1, "lr_decay_epochs": [30, 60]}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if _TYPES.get(key) is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = raw.strip()  # a name like `output_dir=010` stays "010", not 8
        out[key] = value  # as a YAML file would read it otherwise: quotes, null, `no` (False) alike
    return out


def load_config(
    config: str | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Build and validate a config from a YAML file or preset name plus overrides."""
    values: dict[str, Any] = {}
    if config:
        values.update(_read_yaml(config))
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (see `scaling-abs train --help-keys`)")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


SEED_LIMIT = 2**32  # seeds are in [0, SEED_LIMIT): NumPy's range


def check_output_dir(path: str | Path, key: str) -> None:
    """ConfigError naming ``key`` when ``path`` cannot be (made) a folder for a run's output: an
    existing file there or in its way. Checked before any work, so a typo does not cost a run (a
    permission problem still shows when the folder is made)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                way = "" if p == Path(path) else f" (on the way to {path})"
                raise ConfigError(f"{key}: {p} is a file, not a folder{way}")
            return


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def validate(cfg: TrainConfig, *, world_size: int = 1) -> None:
    """Check values and their consistency; raise ConfigError naming the key. No file system access
    except for ``deepspeed`` and an explicit ``data_dir`` (both must exist), ``resume`` (a folder)
    and ``output_dir`` (a folder, or creatable as one)."""
    from scaling_abs import models  # registry names; cheap import
    from scaling_abs.curvature import SOLVERS, parse_block
    from scaling_abs.data import DATASETS, RESIZED_CROP_ONLY

    for key in (
        "lr",
        "lr_final",
        "lr_poly_power",
        "lr_poly_end_epoch",
        "momentum",
        "weight_decay",
        "epochs",
        "adv_eps",
        "grad_clip",
        "hessian_tol",
        "eval_every",
        "alpha",
        "beta",
        "adv_decay",
        "warmup_epochs",
        "adv_stop_epoch",
    ):
        _check(math.isfinite(getattr(cfg, key)), key, f"must be finite, got {getattr(cfg, key)}")
    _check(
        cfg.strategy in STRATEGIES,
        "strategy",
        f"unknown strategy {cfg.strategy!r} (choose {', '.join(STRATEGIES)})",
    )
    _check(
        cfg.model.startswith("hf:") or cfg.model in models.MODELS,
        "model",
        f"unknown model {cfg.model!r} (choose {', '.join(sorted(models.MODELS))} or hf:<name>)",
    )
    _check(
        cfg.dataset.startswith("hf:") or cfg.dataset in DATASETS,
        "dataset",
        f"unknown data set {cfg.dataset!r} (choose {', '.join(sorted(DATASETS))} or hf:<name>)",
    )
    _check(cfg.epochs > 0, "epochs", f"must be > 0, got {cfg.epochs}")
    _check(cfg.batch_size > 0, "batch_size", f"must be > 0, got {cfg.batch_size}")
    _check(
        cfg.max_batch_size >= cfg.batch_size,
        "max_batch_size",
        f"must be >= batch_size ({cfg.batch_size}), got {cfg.max_batch_size}",
    )
    _check(cfg.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {cfg.micro_batch_size}")
    _check(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    _check(
        0 < cfg.lr_decay <= 1, "lr_decay", f"must be in (0, 1] (0.2 divides the LR by 5), got {cfg.lr_decay}"
    )
    _check(
        all(e >= 0 for e in cfg.lr_decay_epochs) and cfg.lr_decay_epochs == sorted(cfg.lr_decay_epochs),
        "lr_decay_epochs",
        f"must be increasing and >= 0, got {cfg.lr_decay_epochs}",
    )
    _check(
        cfg.lr_schedule in ("step", "poly"), "lr_schedule", f"expected step or poly, got {cfg.lr_schedule!r}"
    )
    if cfg.lr_schedule == "poly":
        _check(cfg.lr_poly_power > 0, "lr_poly_power", f"must be > 0, got {cfg.lr_poly_power}")
        _check(cfg.lr_poly_end_epoch >= 0, "lr_poly_end_epoch", f"must be >= 0, got {cfg.lr_poly_end_epoch}")
        _check(0 <= cfg.lr_final <= cfg.lr, "lr_final", f"must be in [0, lr ({cfg.lr})], got {cfg.lr_final}")
    _check(cfg.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {cfg.warmup_epochs}")
    _check(cfg.momentum >= 0, "momentum", f"must be >= 0, got {cfg.momentum}")
    _check(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    _check(cfg.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {cfg.grad_clip}")
    _check(cfg.alpha > 1, "alpha", f"must be > 1, got {cfg.alpha}")
    _check(cfg.beta > 1, "beta", f"must be > 1, got {cfg.beta}")
    _check(cfg.kappa >= 1, "kappa", f"must be >= 1, got {cfg.kappa}")
    _check(
        cfg.adv_decay_on in ADV_DECAY_ON,
        "adv_decay_on",
        f"unknown choice {cfg.adv_decay_on!r} ({' | '.join(ADV_DECAY_ON)})",
    )
    _check(
        cfg.lr_scaling in LR_RULES, "lr_scaling", f"unknown rule {cfg.lr_scaling!r} ({' | '.join(LR_RULES)})"
    )
    _check(cfg.hessian_every >= 0, "hessian_every", f"must be >= 0 (0 = one epoch), got {cfg.hessian_every}")
    _check(cfg.hessian_samples > 0, "hessian_samples", f"must be > 0, got {cfg.hessian_samples}")
    _check(cfg.hessian_iters >= 1, "hessian_iters", f"must be >= 1, got {cfg.hessian_iters}")
    _check(cfg.hessian_tol >= 0, "hessian_tol", f"must be >= 0, got {cfg.hessian_tol}")
    _check(
        cfg.hessian_micro_batch_size >= 0, "hessian_micro_batch_size", "must be >= 0 (0 = micro_batch_size)"
    )
    for key in ("hessian_reuse_graph", "hessian_custom_rules"):
        value = getattr(cfg, key)
        _check(value in ("auto", "true", "false"), key, f"expected auto, true or false, got {value!r}")
    _check(
        not (cfg.hessian_checkpoint and cfg.hessian_reuse_graph == "true"),
        "hessian_checkpoint",
        "excludes hessian_reuse_graph=true (a checkpointed product keeps no graph)",
    )
    try:
        parse_block(cfg.hessian_block)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(
        cfg.hessian_solver in SOLVERS,
        "hessian_solver",
        f"expected {' or '.join(SOLVERS)}, got {cfg.hessian_solver!r}",
    )
    _check(
        cfg.hessian_bn_mode in ("eval", "train"),
        "hessian_bn_mode",
        f"expected eval or train, got {cfg.hessian_bn_mode!r}",
    )
    _check(cfg.adv_eps >= 0, "adv_eps", f"must be >= 0, got {cfg.adv_eps}")
    _check(0 <= cfg.adv_fraction <= 1, "adv_fraction", f"must be in [0, 1], got {cfg.adv_fraction}")
    _check(cfg.adv_decay >= 1, "adv_decay", f"must be >= 1, got {cfg.adv_decay}")
    _check(
        cfg.mixed_precision in ("no", "bf16", "fp16"),
        "mixed_precision",
        f"expected no, bf16 or fp16, got {cfg.mixed_precision!r}",
    )
    _check(
        cfg.hessian_precision in ("auto", "no", "bf16", "fp16"),
        "hessian_precision",
        f"expected auto, no, bf16 or fp16, got {cfg.hessian_precision!r}",
    )
    _check(
        cfg.augmentation in ("auto", "none", "crop_flip", "resized_crop_flip"),
        "augmentation",
        f"unknown augmentation {cfg.augmentation!r}",
    )
    _check(
        cfg.augmentation != "resized_crop_flip" or cfg.dataset == "imagenet",
        "augmentation",
        RESIZED_CROP_ONLY,
    )
    _check(cfg.limit_train_samples >= 0, "limit_train_samples", "must be >= 0")
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
    _check(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    _check(cfg.eval_every > 0, "eval_every", f"must be > 0, got {cfg.eval_every}")
    _check(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    _check(
        0 <= cfg.seed < SEED_LIMIT,
        "seed",
        f"must be in [0, 2**32) (NumPy's and most seeders' range), got {cfg.seed}",
    )
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    check_output_dir(cfg.output_dir, "output_dir")
    if cfg.deepspeed:
        _check(os.path.isfile(cfg.deepspeed), "deepspeed", f"no such DeepSpeed config file: {cfg.deepspeed}")
    if cfg.data_dir:
        _check(os.path.isdir(cfg.data_dir), "data_dir", f"no such directory: {cfg.data_dir}")
    if cfg.resume not in ("", "auto"):
        _check(os.path.isdir(cfg.resume), "resume", f"no such checkpoint folder: {cfg.resume}")
    # The planner splits every global batch evenly over processes (and each share into equal
    # micro-batches of at most micro_batch_size, whatever the share): B and B_max must divide.
    for key in ("batch_size", "max_batch_size"):
        _check(
            getattr(cfg, key) % world_size == 0,
            key,
            f"{getattr(cfg, key)} is not divisible by the {world_size} processes",
        )


def help_keys() -> str:
    """One line per key: name, default, help (for `scaling-abs train --help-keys`)."""
    rows = []
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((name, '""' if default == "" else str(default), f.metadata["help"]))
    name_w, default_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"  {n:{name_w}s}  {d:{default_w}s}  {h}" for n, d, h in rows)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
