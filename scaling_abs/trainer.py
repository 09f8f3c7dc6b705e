"""The training loop: Accelerate (and its DeepSpeed plugin) around the core library.

One optimizer step, top to bottom (DESIGN.md's flow):
  settings = schedule.at(epoch)            global batch, LR multiplier, adversarial fraction
  plan     = make_plan(B, micro, world)    micro-batch x accumulation x processes
  for each micro-batch: [FGSM on a gamma fraction, same autocast] -> forward -> backward (no sync
  until the last one) ; lr = base x multiplier ; optimizer step
  every hessian_every samples: top eigenvalue -> schedule.observe -> maybe a new plan next step

Single process:            scaling-abs train model=mlp epochs=1
Two processes on one node: accelerate launch --multi_gpu --num_processes 2 -m scaling_abs train ...
                           torchrun --nproc_per_node 2 --master_addr 127.0.0.1 -m scaling_abs train ...
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from scaling_abs import _malloc, _second_order, curvature, distributed, versions
from scaling_abs.adversarial import mix_adversarial
from scaling_abs.batching import MicroBatchSampler, Plan, SampleOrder, make_plan, small_micro_batches
from scaling_abs.config import TrainConfig, dump_config, validate
from scaling_abs.data import DataBundle, SeededAugmentation, build_dataset, collate_batch, seeded_cpu_rng
from scaling_abs.errors import UserError
from scaling_abs.models import build_model, count_parameters, model_default_augmentation
from scaling_abs.models.vision import hf_path
from scaling_abs.report import read_records, read_summary
from scaling_abs.schedules import build_schedule, checks_before_last_step

try:  # the output_dir's lock; elsewhere than on Linux and macOS a second run is not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CHECKPOINT_PREFIX = "step_"
# Accelerate names registered objects' files by their order: schedule, TrainState, CurvatureState
CURVATURE_STATE_FILE = "custom_checkpoint_2.pkl"
_AUTO_BOOL = {"auto": "auto", "true": True, "false": False}  # hessian_reuse_graph / _custom_rules
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed_precision / hessian_precision


@dataclass
class TrainState:
    """What the loop needs to resume, beyond model/optimizer/schedule: the stream position."""

    samples: int = 0
    step: int = 0
    checks: int = 0
    next_check: int = 0
    next_eval: int = 0
    curvature_time_s: float = 0.0
    adversarial_time_s: float = 0.0
    wall_time_s: float = 0.0
    max_batch_size: int = 0
    last_loss: float = float("nan")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class CurvatureState:
    """The last finite check's eigenvector (kept on the host between checks), the start of the next
    check's eigenvalue estimate when ``hessian_warm_start`` is on. Checkpointed so a resumed run starts
    its next check from the same vector as the uninterrupted one."""

    def __init__(self) -> None:
        self.eigenvector: list[torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"eigenvector": self.eigenvector}  # already host tensors (set by Trainer._check)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eigenvector = state.get("eigenvector")

    def start(self, params: list[torch.Tensor], *, seed: int) -> list[torch.Tensor] | None:
        """The warm start for ``params``, or None (cold) when there is no vector of their shapes
        (the first check, or a block that changed)."""
        prev = self.eigenvector
        if prev is None or [v.shape for v in prev] != [p.shape for p in params]:
            return None
        return curvature.warm_start(prev, params, seed=seed)


class _Preemption:
    """SIGTERM or Ctrl-C (SIGINT) sets a flag: the loop checkpoints at the next optimizer-step
    boundary and stops. A second Ctrl-C stops at once (KeyboardInterrupt). While the run writes its
    outputs at the end, a signal waits until they are complete."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.finishing = False  # the outputs are being written: no signal stops that
        self.signal: str | None = None  # the first signal's name
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        if threading_main():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT and not self.finishing:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _launch_settings(cfg: TrainConfig) -> TrainConfig:
    """The run as launched: ``accelerate launch`` with a DeepSpeed config file gives its file when
    ``deepspeed=`` is empty (the run was a plain one, silently); a multi-process environment must be
    whole (Accelerate raised a traceback); a DeepSpeed run started without a launcher gets a
    one-process group on the loopback address (DeepSpeed otherwise looks for MPI, and fails)."""
    env = os.environ
    if not cfg.deepspeed and env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if not path:
            raise UserError(
                "deepspeed: launched with an Accelerate DeepSpeed config that names no DeepSpeed JSON file "
                "(deepspeed_config_file); pass one as deepspeed=<file> (ds_configs/ has some)"
            )
        cfg = replace(cfg, deepspeed=path)
    world = env.get("WORLD_SIZE", "1")
    if not world.isdigit():
        raise UserError(f"launch: WORLD_SIZE must be a process count, got {world!r}")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if int(world) > 1 and missing:
        raise UserError(
            f"launch: WORLD_SIZE={world} but {', '.join(missing)} not set; start the processes with torchrun "
            "or accelerate launch, which set all of " + ", ".join(DISTRIBUTED_VARIABLES)
        )
    if cfg.deepspeed and not any(v in env for v in DISTRIBUTED_VARIABLES):
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(distributed.free_port())
    return cfg


def _build_accelerator(cfg: TrainConfig, plan: Plan):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    no_gpu = not torch.cuda.is_available()
    # Without cpu=True torchrun's processes trained independently, silently (DESIGN pitfalls); but
    # Accelerate turns its DeepSpeed plugin off under cpu=True (the run then is a plain one, silently),
    # so a DeepSpeed run on a CPU machine leaves it False and lets DeepSpeed pick its CPU accelerator.
    cpu = no_gpu and not cfg.deepspeed
    kwargs: dict[str, Any] = {"mixed_precision": cfg.mixed_precision, "cpu": cpu}
    if no_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if cfg.deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=_deepspeed_config(cfg, plan))
    return Accelerator(**kwargs)


def _deepspeed_config(cfg: TrainConfig, plan: Plan) -> dict[str, Any]:
    """Read the JSON and fill its "auto" values from the run's settings."""
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"deepspeed: cannot read {cfg.deepspeed}: {e}") from None
    if not isinstance(ds, dict):
        raise UserError(f"deepspeed: {cfg.deepspeed} must hold a JSON object of DeepSpeed settings")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(
                f'deepspeed: {cfg.deepspeed} names {"an" if key == "optimizer" else "a"} {key} ("{key}": ...); '
                "the run's SGD and learning rate schedule are the method's (lr, momentum, weight_decay, "
                "lr_decay...): remove it"
            )
    if ds.get("zero_force_ds_cpu_optimizer") is True:
        raise UserError(
            f"deepspeed: zero_force_ds_cpu_optimizer true in {cfg.deepspeed} replaces the run's SGD with "
            "DeepSpeed's CPU Adam when the optimizer is offloaded; set it to false"
        )
    # Accelerate (and DeepSpeed) swap any optimizer for DeepSpeed's CPU Adam under optimizer offload
    # unless told not to: zero3_offload ran Adam at SGD's lr, and diverged.
    ds["zero_force_ds_cpu_optimizer"] = False
    fill = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        # Explicit: Accelerate's plugin defaulted to 1.0 (DESIGN pitfalls).
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:  # DeepSpeed's would win: a traceback, or a silently other run
            ours = (
                "grad_clip"
                if key == "gradient_clipping"
                else "the first plan (batch_size, micro_batch_size, processes)"
            )
            raise UserError(
                f'deepspeed: {key} in {cfg.deepspeed} is {ds[key]!r}, the run\'s is {value} (from {ours}); set it to "auto"'
            )
    for prec, on in (("bf16", cfg.mixed_precision == "bf16"), ("fp16", cfg.mixed_precision == "fp16")):
        if isinstance(ds.get(prec), dict) and ds[prec].get("enabled") == "auto":
            ds[prec]["enabled"] = on
    low = [p for p in ("bf16", "fp16") if isinstance(ds.get(p), dict) and ds[p].get("enabled") is True]
    if low and cfg.hessian_precision == "no":
        raise UserError(
            f"hessian_precision: no (fp32 checks) is not possible with DeepSpeed's {low[0]}, which keeps the "
            f"model itself in {low[0]} (checks then run in it: hessian_precision=auto)"
        )
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


# Settings a checkpoint must be resumed with: they fix the data stream, the model and the schedule's
# state. Others may change on resume (epochs to extend a run, evaluation and checkpoint frequency,
# the LR schedule, the checks' settings).
RUN_KEYS = ("model", "dataset", "strategy", "batch_size", "max_batch_size", "seed", "limit_train_samples")
CHECKPOINT_CONFIG = "run_config.yaml"
CHECKPOINT_LAUNCH = "launch.json"  # the process count and ZeRO stage a checkpoint was written with


def _finished_summary(output_dir: Path, step: int | None = None) -> dict[str, Any] | None:
    """The summary of the finished run in ``output_dir`` (of exactly ``step`` updates, when given),
    or None: no summary, an unreadable one, or an interrupted run."""
    try:
        summary = read_summary(output_dir)
    except UserError:
        return None
    if summary.get("interrupted", True):
        return None
    return summary if step is None or summary.get("updates") == step else None


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is a .tmp folder and never listed)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    done = [p for p in done if (p / "trainer_state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _warn(message: str) -> None:
    """A run's warning, at every run: Python shows a message once per code line and process, which
    would hide it from a second ``train()`` in a notebook or a sweep. Filters still apply, and it
    names this file, so the command line prints it as one line."""
    caller = sys._getframe(1)
    warnings.warn_explicit(message, UserWarning, caller.f_code.co_filename, caller.f_lineno, registry={})


class Trainer:
    """Builds everything from a config and runs it; :meth:`fit` returns the summary dict."""

    def __init__(self, cfg: TrainConfig):
        cfg = _launch_settings(cfg)
        cache_lomo_check()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world)
        if cfg.hessian_warm_start and cfg.hessian_solver == "power" and os.environ.get("RANK", "0") == "0":
            _warn(
                "hessian_warm_start with hessian_solver=power can stop on the previous top direction "
                "well below the eigenvalue (measured: 34 % low once); use hessian_solver=lanczos"
            )
        self.schedule = build_schedule(
            cfg.strategy,
            batch_size=cfg.batch_size,
            max_batch_size=cfg.max_batch_size,
            base_batch_size=cfg.batch_size,
            lr_decay=cfg.lr_decay,
            lr_decay_epochs=tuple(cfg.lr_decay_epochs),
            warmup_epochs=cfg.warmup_epochs,
            alpha=cfg.alpha,
            beta=cfg.beta,
            kappa=cfg.kappa,
            adv_fraction=cfg.adv_fraction,
            adv_decay=cfg.adv_decay,
            adv_decay_on=cfg.adv_decay_on,
            adv_stop_epoch=cfg.resolved_adv_stop_epoch,
            lr_scaling=cfg.lr_scaling,
            lr_poly=cfg.resolved_lr_poly,
            multiple_of=world,
        )
        first = self.schedule.at(0.0)
        self.plan = make_plan(first.batch_size, cfg.micro_batch_size, world)
        self.accelerator = _build_accelerator(cfg, self.plan)
        acc = self.accelerator
        assert acc.num_processes == world, f"Accelerate sees {acc.num_processes} processes, env says {world}"
        self.malloc_tuned = cfg.cpu_malloc and acc.device.type == "cpu" and _malloc.tune()
        torch.manual_seed(cfg.seed)

        with _built_whole(acc):
            self.data, self.model = build_data_and_model(cfg)
        if cfg.channels_last:  # before the ZeRO-3 blueprint and prepare: every copy has the layout
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_params = count_parameters(self.model)
        if cfg.hessian_checkpoint and curvature.units_of(self.model) is None:
            raise UserError(
                f"hessian_checkpoint: model {cfg.model} cannot be split into pieces (known: the zoo's models, "
                "nn.Sequential, torchvision ResNet / AlexNet, transformers ViT, or a hessian_units() method)"
            )
        block = curvature.parse_block(cfg.hessian_block)  # the config checked its form
        if block is not None and block > (layers := curvature.layer_count(self.model)):
            raise UserError(
                f"hessian_block: last:{block}, but model {cfg.model} has {layers} layers with parameters "
                f"(last:1 to last:{layers}, or all for the whole Hessian)"
            )
        self._chain_plans: dict = {}  # every check's chain plans here (ZeRO-3 checks a new copy each time)
        # the checks' autocast: training's unless hessian_precision says otherwise
        self.check_precision = (
            cfg.mixed_precision if cfg.hessian_precision == "auto" else cfg.hessian_precision
        )
        # What checks use after running out of memory once (single process: see _shrink_checks).
        self._check_memory = {
            "reuse_graph": _AUTO_BOOL[cfg.hessian_reuse_graph],
            "checkpoint": cfg.hessian_checkpoint,
            "micro": cfg.hessian_micro_batch_size or cfg.micro_batch_size,
        }
        # ZeRO-3 checks run on a plain copy of the model (see _curvature_model): its blueprint is
        # taken here, before prepare partitions the parameters.
        ds_stage = (
            _deepspeed_config(cfg, self.plan).get("zero_optimization", {}).get("stage")
            if cfg.deepspeed
            else None
        )
        self._blueprint = copy.deepcopy(self.model) if ds_stage == 3 else None
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        # The module itself, whatever wraps it (DDP, the DeepSpeed engine; in place: Accelerate's
        # autocast forward). Kept here rather than asking ``unwrap_model`` at every step: that
        # imports DeepSpeed, whose import warns "Setting accelerator to CPU" in plain CPU runs.
        self._raw_model = self.model
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.engine = self.model if acc.distributed_type.name == "DEEPSPEED" else None
        if self.engine is not None:  # the method's SGD, not an optimizer DeepSpeed swapped in
            assert isinstance(self.engine.basic_optimizer, torch.optim.SGD), type(self.engine.basic_optimizer)
        if cfg.deepspeed and self.engine is None:
            # Accelerate drops its DeepSpeed plugin without a word in some set-ups (cpu=True did).
            raise UserError(
                f"deepspeed: Accelerate did not enable DeepSpeed ({acc.distributed_type.name} run)"
            )
        self.n_train = len(self.data.train)
        self.order = SampleOrder(self.n_train, seed=cfg.seed)
        self.total_samples = int(math.ceil(cfg.epochs * self.n_train))
        self.versions = versions()  # for summary.json, read at the start
        self.check_every = cfg.hessian_every or self.n_train
        self.eval_every = max(1, int(round(cfg.eval_every * self.n_train)))
        self.state = TrainState(next_check=self.check_every, next_eval=self.eval_every)
        self.curvature_state = CurvatureState()
        # the order is the checkpoint's custom_checkpoint_<i>.pkl numbering (CURVATURE_STATE_FILE):
        # append, never reorder
        acc.register_for_checkpointing(self.schedule, self.state, self.curvature_state)
        self._loader_iter = None
        self._metrics = None
        self._tb = None
        self._last_eval: tuple[int, dict[str, float]] | None = None  # (step, evaluate())
        self._lock = None  # output_dir/.lock, held from fit() to close()

    # -- helpers -----------------------------------------------------------------------
    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without DDP's or DeepSpeed's wrapper (what ``accelerator.unwrap_model`` gives)."""
        return self._raw_model

    @property
    def epoch(self) -> float:
        return self.state.samples / self.n_train

    def _loader(self, plan: Plan):
        """A DataLoader over this rank's micro-batches from the current stream position."""
        sampler = MicroBatchSampler(self.order, plan, self.state.samples, rank=self.accelerator.process_index)
        return torch.utils.data.DataLoader(
            SeededAugmentation(self.data.train),
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.accelerator.device.type == "cuda",
            # its own generator: a new iterator (at every plan change, and at a resume) must not
            # advance the global one that dropout and the rest of training draw from
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            kind = record["kind"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("kind", "step", "samples"):
                    self._tb.add_scalar(f"{kind}/{key}", value, record.get("samples", 0))

    def _open_logs(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            # A resumed run replays the steps after its checkpoint: drop their old records.
            # (and a line cut short when the run was killed mid-write, with a warning)
            keep = [r for r in read_records(metrics) if r.get("samples", 0) <= self.state.samples]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._metrics = open(self.out / "metrics.jsonl", "a")
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tb = None
            else:
                # resumed: TensorBoard drops what the old event files hold past the checkpoint (a
                # run killed after it logged further), as metrics.jsonl's records are dropped above
                # (a run killed before its first checkpoint starts again at 0: everything goes)
                purge = self.state.samples + 1 if self.state.samples else 0
                self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)

    # -- one optimizer step ----------------------------------------------------------------
    def _on_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the run's device, images in the model's layout (``channels_last``: explicit
        channels-last strides, one-channel data too)."""
        x, y = x.to(self.accelerator.device), y.to(self.accelerator.device)
        if self.cfg.channels_last and x.dim() == 4:
            x = _second_order._nhwc(x)
        return x, y

    def _train_step(self, plan: Plan, lr: float, adv_fraction: float) -> float:
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        total_loss = torch.zeros((), device=acc.device)
        for j in range(plan.accumulation):
            inputs, targets = next(self._loader_iter)
            inputs, targets = self._on_device(inputs, targets)
            last = j == plan.accumulation - 1
            with acc.autocast():
                if adv_fraction > 0 and cfg.adv_eps > 0:
                    _sync(acc.device)  # FGSM's own time, not the queued work before it
                    t0 = time.perf_counter()
                    # FGSM on the unwrapped model: eval mode, no DDP hooks, grads untouched. The
                    # global batch's ceil(gamma * B) rows, spread over its micro-batches and ranks.
                    inputs = mix_adversarial(
                        self.raw_model,
                        inputs,
                        targets,
                        adv_fraction,
                        cfg.adv_eps,
                        global_batch=plan.global_batch,
                        offset=acc.process_index * plan.per_rank + j * plan.micro,
                    )
                    _sync(acc.device)  # a GPU queues FGSM's work: the timer waits for it
                    self.state.adversarial_time_s += time.perf_counter() - t0
                loss = F.cross_entropy(self.model(inputs), targets)
            total_loss += loss.detach()
            if self.engine is not None:
                # Straight to the engine: it scales by its own accumulation count (set with
                # set_train_batch_size) and steps at the boundary we mark. Accelerate's wrapper would
                # mark every micro-batch a boundary outside its `accumulate` context.
                self.engine.set_gradient_accumulation_boundary(last)
                if last:
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                self.engine.backward(loss)
                if last:
                    self.engine.step()
            else:
                # Accelerate's gradient_accumulation_steps stays 1 (so its backward does not rescale);
                # the plan's accumulation is explicit here, and no_sync skips the all-reduce until the
                # last micro-batch of the step.
                sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
                with sync:
                    acc.backward(loss / plan.accumulation)
        if self.engine is None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr  # base schedule x strategy multiplier, applied at step time
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.num_processes > 1:  # one set of BatchNorm statistics for all ranks
            distributed.average_buffers_(self.raw_model)
        # sync point: the loss is logged every step (mean over micro-batches and ranks)
        mean = acc.reduce(total_loss / plan.accumulation, reduction="mean")
        return float(mean)

    def _set_plan(self, plan: Plan) -> None:
        slow = small_micro_batches(plan, self.cfg.micro_batch_size)
        if slow and self.accelerator.is_main_process:  # once per plan and run: at the start and changes
            _warn(slow)
        engine = self.engine
        if engine is not None and (engine.train_micro_batch_size_per_gpu(), engine.train_batch_size()) != (
            plan.micro,
            plan.global_batch,
        ):
            # Only at an optimizer-step boundary (DESIGN pitfalls). The micro-batch first: DeepSpeed
            # divides each micro-batch's loss by the accumulation count it derives from the batch and
            # its micro-batch, and the plan's micro-batch grows while the share is below
            # micro_batch_size (set_train_batch_size alone kept 64 and divided a 256 by 4, not 1).
            engine.set_train_micro_batch_size(plan.micro)
            engine.set_train_batch_size(plan.global_batch)
            assert engine.gradient_accumulation_steps() == plan.accumulation, (
                engine.gradient_accumulation_steps(),
                plan,
            )
        self.plan = plan
        self._loader_iter = iter(self._loader(plan))

    # -- curvature check --------------------------------------------------------------------
    def _hessian_batches(
        self, samples: int | None = None, seed: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of a seeded draw of ``samples`` (default ``hessian_samples``) training
        samples, micro-batched; the default seed follows the check count. With augmentation the
        images are augmented as in training (the Hessian of the loss being trained), drawn from a
        generator seeded by the draw and the rank: a check is a function of the seed and the check
        number, and leaves the global random state alone (it drew from it before 2026-11-27)."""
        acc = self.accelerator
        draw_seed = hessian_seed(self.cfg, self.state.checks, seed)
        idx = hessian_draw(
            self.cfg,
            self.n_train,
            self.state.checks,
            samples=samples,
            seed=draw_seed,
            world=acc.num_processes,
            rank=acc.process_index,
        )
        with seeded_cpu_rng((draw_seed * 65_537 + acc.process_index) % 2**63):
            return fetch_batches(self.data.train, idx, self._check_memory["micro"], acc.device)

    def _curvature_model(self) -> torch.nn.Module:
        """The module the check differentiates. ZeRO-3 keeps only a shard of each parameter on a rank
        and its hooks track every module call, which a second backward confuses ("Cannot free a ZeRO-3
        parameter while it is still active"): the parameters are gathered into a plain copy of the
        model, made on the device for this check only (the blueprint waits in host memory)."""
        if self._blueprint is None:
            return self.raw_model
        import deepspeed

        plain = copy.deepcopy(self._blueprint).to(self.accelerator.device)
        live = dict(self.raw_model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(live.values()), modifier_rank=None), torch.no_grad():
            for name, p in plain.named_parameters():
                p.copy_(live[name].data)
        with torch.no_grad():
            for name, b in self.raw_model.named_buffers():
                plain.get_buffer(name).copy_(b)
        plain.train(self.raw_model.training)
        return plain

    def _shrink_checks(self, model: torch.nn.Module) -> str | None:
        """After a check ran out of memory: the next memory lever, kept for the rest of the run. In
        order: fresh graphs instead of kept ones (set, or kept as they fit on CUDA), checkpointed products (where the
        model has a chain), half the micro-batch (down to 1). None: nothing left, or several
        processes (one rank retrying alone would leave the others waiting in an all-reduce)."""
        mem = self._check_memory
        if self.accelerator.num_processes > 1:
            return None
        keeps_several = (  # "auto" with several micro-batches on CUDA keeps what fits ("fit")
            mem["reuse_graph"] == "auto"
            and not mem["checkpoint"]  # checkpointed products keep no graph
            and self.cfg.hessian_samples > mem["micro"]
            and self.accelerator.device.type in curvature.MEASURED_DEVICES
        )
        if mem["reuse_graph"] is True or keeps_several:
            mem["reuse_graph"] = False
            return "it builds each micro-batch's graph afresh (hessian_reuse_graph=false)"
        if not mem["checkpoint"] and curvature.units_of(model) is not None:
            mem["checkpoint"], mem["reuse_graph"] = True, "auto"
            return "its products are checkpointed (hessian_checkpoint=true)"
        if mem["micro"] > 1:
            mem["micro"] = max(1, mem["micro"] // 2)
            return f"its micro-batches hold {mem['micro']} samples (hessian_micro_batch_size={mem['micro']})"
        return None

    def _hessian_chain(self, model: torch.nn.Module) -> curvature.Chain:
        """The model's chain, sharing the run's planned cuts: only the first check plans and checks
        the chain, also under ZeRO-3, whose checks run on a new plain copy of the model each time."""
        ch = curvature.chain(model)
        ch._plans = self._chain_plans
        return ch

    def _eigenvalue_shrinking(self, model, params, dtype, seed, init, shrunk) -> curvature.EigenResult:
        """The check's estimate; after running out of memory, again with the next memory lever
        (each change appended to ``shrunk``)."""
        cfg = self.cfg
        while True:
            mem = self._check_memory
            try:
                result = curvature.top_eigenvalue(
                    model,
                    curvature.cross_entropy_loss,
                    self._hessian_batches(),
                    params=params,
                    max_iter=cfg.hessian_iters,
                    tol=cfg.hessian_tol,
                    seed=seed,
                    bn_mode=cfg.hessian_bn_mode,
                    autocast_dtype=dtype,
                    reuse_graph=mem["reuse_graph"],
                    custom_rules=_AUTO_BOOL[cfg.hessian_custom_rules],
                    init=init,
                    solver=cfg.hessian_solver,
                    checkpoint=self._hessian_chain(model) if mem["checkpoint"] else False,
                )
                break
            except torch.OutOfMemoryError as e:
                change = self._shrink_checks(model)
                if change is None:
                    e.add_note(
                        "scaling_abs: a curvature check ran out of memory; smaller checks: "
                        "hessian_micro_batch_size, hessian_checkpoint=true, hessian_samples"
                    )
                    raise
                shrunk.append(change)
                _warn(f"a curvature check ran out of memory; from now on {change}")
            # here, not in the except clause: its traceback still holds the failed attempt's tensors
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return result

    def _check(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        model = self._curvature_model()
        params = curvature.resolve_block(model, cfg.hessian_block)
        dtype = _AUTOCAST.get(self.check_precision)
        seed = cfg.seed + self.state.checks
        init = self.curvature_state.start(params, seed=seed) if cfg.hessian_warm_start else None
        shrunk = []
        with _own_forward(model):
            result = self._eigenvalue_shrinking(model, params, dtype, seed, init, shrunk)
        if result.finite:  # a non-finite estimate leaves the schedule alone, and the start vector too
            self.curvature_state.eigenvector = [v.detach().cpu() for v in result.eigenvector]
        before = self.schedule.at(self.epoch).batch_size
        grew = self.schedule.observe(result.eigenvalue)  # every rank sees the same all-reduced value
        after = self.schedule.at(self.epoch).batch_size
        seconds = time.perf_counter() - t0
        self.state.curvature_time_s += seconds
        self.state.checks += 1
        return {
            "kind": "check",
            "step": self.state.step,
            "samples": self.state.samples,
            "epoch": self.epoch,
            "eigenvalue": result.eigenvalue,
            "iterations": result.iterations,
            "converged": result.converged,
            "finite": result.finite,
            "warm_start": init is not None,
            "solver": cfg.hessian_solver,
            "hessian_samples": self.cfg.hessian_samples,
            "precision": self.check_precision,
            "block": cfg.hessian_block,
            "block_params": sum(p.numel() for p in params),  # what a product all-reduces
            "checkpoint": self._check_memory["checkpoint"],
            "hessian_micro_batch_size": self._check_memory["micro"],
            "kept_graphs": result.kept_graphs,  # micro-batch graphs kept (hessian_reuse_graph)
            "out_of_memory": shrunk,
            "seconds": seconds,
            "batch_before": before,
            "batch_after": after,
            "grew": grew,
        }

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        acc = self.accelerator
        model = self.model  # the wrapper: DeepSpeed ZeRO-3 gathers parameters in its forward
        was_training = model.training
        model.eval()
        n = len(self.data.test)
        idx = list(range(acc.process_index, n, acc.num_processes))
        correct = torch.zeros((), dtype=torch.float64, device=acc.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        bs = max(self.cfg.micro_batch_size, 256)
        for i in range(0, len(idx), bs):
            x, y = collate_batch(_fetch(self.data.test, idx[i : i + bs]))
            x, y = self._on_device(x, y)
            with acc.autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
        model.train(was_training)
        stats = distributed.all_reduce_sum_([torch.stack([correct, loss_sum])])[0]
        # sync point: evaluation results are logged
        return {"test_accuracy": float(stats[0]) / n, "test_loss": float(stats[1]) / n}

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Atomic: Accelerate writes into a temp folder that is renamed when complete."""
        acc = self.accelerator
        root = self.out / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.state.step}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.state.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            dump_config(self.cfg, tmp / CHECKPOINT_CONFIG)  # what resuming it must agree with
            (tmp / CHECKPOINT_LAUNCH).write_text(json.dumps(self._launch()))
            (tmp / "trainer_state.json").write_text(json.dumps(self.state.state_dict()))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _checkpoints(self.out)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _start_afresh(self) -> None:
        """A fresh run (no ``resume``) in a folder that holds a run. A finished one moves to
        ``previous_run/`` (replacing an older one there), so that nothing of it is resumed or read
        later as this run's, and nothing is lost if this run fails; an unfinished one is refused,
        since its checkpoints are the only way to continue it. Decided on the main process (the
        one that writes the folder) and shared, so every rank acts alike."""
        acc = self.accelerator
        decision = "none"
        if acc.is_main_process:
            found = _checkpoints(self.out)
            if found:
                done = _finished_summary(self.out)
                # a finished run's last checkpoint may be before its end (written before the end
                # was always checkpointed), never after it
                last = int(found[-1].name[len(CHECKPOINT_PREFIX) :])
                decision = "move" if done is not None and done.get("updates", -1) >= last else found[-1].name
        decision = distributed.broadcast_object(decision)
        if decision not in ("none", "move"):
            raise UserError(
                f"output_dir: {self.out} holds an unfinished run (checkpoint {decision}): resume=auto "
                "continues it; to start afresh choose another output_dir or remove that one"
            )
        if decision == "move" and acc.is_main_process:
            previous = self.out / "previous_run"
            shutil.rmtree(previous, ignore_errors=True)
            previous.mkdir()
            for name in (
                "checkpoints",
                "tensorboard",
                "summary.json",
                "model.safetensors",
                "metrics.jsonl",
                "config.yaml",
            ):
                if (self.out / name).exists():
                    os.replace(self.out / name, previous / name)
            _warn(f"{self.out} held a finished run: moved to {previous} for this fresh run")
        acc.wait_for_everyone()

    def _claim_output_dir(self) -> None:
        """One run per folder at a time: the main process holds an exclusive lock on
        ``output_dir/.lock`` while the run is open (the system releases it when the process ends,
        however it ends), and a second run there is refused. It also clears checkpoint folders that
        a killed run left half-written (``.tmp-step_N``: never read, only in the way)."""
        acc = self.accelerator
        busy = None
        if acc.is_main_process and fcntl is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = open(self.out / ".lock", "a+")  # noqa: SIM115 (held until close())
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                busy = lock.read().strip() or "another process"
                lock.close()
            else:
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()}\n")
                lock.flush()
                self._lock = lock
                for tmp in (self.out / "checkpoints").glob(f".tmp-{CHECKPOINT_PREFIX}*"):
                    shutil.rmtree(tmp, ignore_errors=True)
        busy = distributed.broadcast_object(busy)
        if busy:
            raise UserError(f"output_dir: {self.out} is in use by another run ({busy})")

    def _resume(self) -> Path | None:
        cfg = self.cfg
        if not cfg.resume:
            self._start_afresh()
            return None
        if cfg.resume == "auto":
            found = _checkpoints(self.out)
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(cfg.resume)
            if not (path / "trainer_state.json").exists():
                raise UserError(f"resume: {path} is not a complete scaling_abs checkpoint")
        if not (path / CURVATURE_STATE_FILE).exists():
            raise UserError(
                f"resume: {path} was written by an older scaling_abs (no {CURVATURE_STATE_FILE}); "
                "finish that run with the version that started it, or start afresh"
            )
        self._check_resumable(path)
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, ValueError, KeyError) as e:
            # PyTorch's "Error(s) in loading state_dict" (other layers or shapes), the optimizer's
            # "doesn't match the size of optimizer's group" (other parameters): another model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "state_dict" not in first and "optimizer" not in first and "parameter group" not in first:
                raise
            raise UserError(
                f"resume: {path} does not fit this run's model, optimizer or schedule (was it written "
                f"with another model or settings?): {first}"
            ) from None
        return path

    def _launch(self) -> dict[str, Any]:
        stage = self.engine.zero_optimization_stage() if self.engine is not None else None
        return {"processes": self.accelerator.num_processes, "deepspeed_zero_stage": stage}

    def _check_resumable(self, path: Path) -> None:
        """The checkpoint's run-defining settings (:data:`RUN_KEYS`) against this run's, and under
        DeepSpeed its process count and ZeRO stage (its optimizer state is saved per rank; a plain
        run's checkpoint resumes on any number of processes)."""
        launch = path / CHECKPOINT_LAUNCH
        if launch.exists():
            old, now = json.loads(launch.read_text()), self._launch()
            stages = old["deepspeed_zero_stage"], now["deepspeed_zero_stage"]
            if stages[0] != stages[1] or (stages[1] is not None and old["processes"] != now["processes"]):
                ran = [
                    "{} processes, DeepSpeed ZeRO stage {}".format(d["processes"], d["deepspeed_zero_stage"])
                    for d in (old, now)
                ]
                raise UserError(
                    f"resume: {path} was written by {ran[0]}, this run has {ran[1]} (None: no "
                    "DeepSpeed); a DeepSpeed checkpoint resumes with its stage and process count, a "
                    "plain one without DeepSpeed on any number of processes"
                )
        saved = path / CHECKPOINT_CONFIG
        if not saved.exists():  # written before the file existed: the state dicts still check
            return
        old = yaml.safe_load(saved.read_text()) or {}
        differ = [k for k in RUN_KEYS if k in old and old[k] != getattr(self.cfg, k)]
        if differ:
            was = ", ".join(f"{k}={old[k]}" for k in differ)
            now = ", ".join(f"{k}={getattr(self.cfg, k)}" for k in differ)
            raise UserError(
                f"resume: {path} was written with {was}, this run has {now}; resume with the "
                "checkpoint's settings, or start afresh in another output_dir"
            )

    # -- the run -------------------------------------------------------------------------------
    def _too_few_checks(self) -> str | None:
        """ABS's warning for a run too short for kappa, counted at the first batch (growth only
        makes steps fewer)."""
        batch, enough = self.plan.global_batch, self.schedule.kappa + 1
        checks = checks_before_last_step(self.total_samples, batch, self.check_every)
        steps = checks_before_last_step(self.total_samples, batch, batch)  # a check a step at most
        longest = steps * batch // enough if steps >= enough else 0  # the longest interval for kappa
        return self.schedule.too_few_checks(checks, longest)

    def fit(self) -> dict[str, Any]:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self._claim_output_dir()
        resumed = self._resume()
        if resumed is not None and state.samples >= self.total_samples:
            # resume=auto on a finished run: nothing to train or write (the main process reads the
            # folder; every rank returns alike)
            done = distributed.broadcast_object(
                _finished_summary(self.out, state.step) if acc.is_main_process else None
            )
            if done is not None:
                return done
        if resumed is None and acc.is_main_process and self.schedule.adaptive:
            few = self._too_few_checks()
            if few:
                _warn(few)
        self._open_logs()
        if resumed is not None:
            self._log(
                {"kind": "resume", "checkpoint": str(resumed), "samples": state.samples, "step": state.step}
            )
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_samples,
                initial=min(state.samples, self.total_samples),
                unit="sample",
                unit_scale=True,
                dynamic_ncols=True,
                postfix={"epoch": f"{self.epoch:.2f}"},  # a resumed run's bar starts past 0
            )
        start = time.perf_counter() - state.wall_time_s
        interrupted = False
        ckpt_epoch = int(state.samples // self.n_train)
        with _Preemption() as preempt:
            while state.samples < self.total_samples:
                settings = self.schedule.at(self.epoch)
                plan = make_plan(settings.batch_size, cfg.micro_batch_size, acc.num_processes)
                if plan != self.plan or self._loader_iter is None:
                    self._set_plan(plan)
                lr = cfg.lr * settings.lr_multiplier
                t0 = time.perf_counter()
                loss = self._train_step(plan, lr, settings.adv_fraction)
                state.samples += plan.global_batch
                state.step += 1
                state.last_loss = loss
                state.max_batch_size = max(state.max_batch_size, plan.global_batch)
                self._log(
                    {
                        "kind": "step",
                        "step": state.step,
                        "samples": state.samples,
                        "epoch": self.epoch,
                        "batch_size": plan.global_batch,
                        "micro_batch": plan.micro,
                        "accumulation": plan.accumulation,
                        "lr": lr,
                        "adv_fraction": settings.adv_fraction,
                        "loss": loss,
                        "step_time_s": time.perf_counter() - t0,
                    }
                )
                if bar is not None:  # the postfix first: update draws the bar with it
                    bar.set_postfix(
                        epoch=f"{self.epoch:.2f}",
                        batch=plan.global_batch,
                        lr=f"{lr:.3g}",
                        loss=f"{loss:.4f}",
                        refresh=False,
                    )
                    bar.update(min(plan.global_batch, self.total_samples - bar.n))
                if state.samples >= state.next_check:
                    state.next_check += self.check_every * (
                        1 + (state.samples - state.next_check) // self.check_every
                    )
                    if self.schedule.adaptive and getattr(self.schedule, "wants_checks", True):
                        record = self._check()
                        self._log(record)
                        if bar is not None:
                            bar.write(
                                f"check @ epoch {self.epoch:.2f}: eigenvalue {record['eigenvalue']:.4g}, "
                                f"batch {record['batch_before']} -> {record['batch_after']}"
                            )
                if state.samples >= state.next_eval or state.samples >= self.total_samples:
                    state.next_eval += self.eval_every * (
                        1 + (state.samples - state.next_eval) // self.eval_every
                    )
                    self._last_eval = (state.step, self.evaluate())
                    self._log(
                        {
                            "kind": "eval",
                            "step": state.step,
                            "samples": state.samples,
                            "epoch": self.epoch,
                            **self._last_eval[1],
                        }
                    )
                state.wall_time_s = time.perf_counter() - start
                epoch_now = int(state.samples // self.n_train)
                due = (
                    (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0)
                    or (not cfg.checkpoint_every and epoch_now > ckpt_epoch)
                    or state.samples >= self.total_samples  # the end: resume=auto finds it done
                )
                ckpt_epoch = epoch_now
                # every rank must agree to stop: a signal may reach only some of them
                stop = bool(distributed.all_reduce_sum(float(preempt.requested)))
                if due or stop:
                    self.save_checkpoint()
                if stop:
                    interrupted = True
                    break
            if bar is not None:
                bar.close()
            # still under the handler: a signal now waits until the outputs are written
            preempt.finishing = True
            return self._finish(interrupted, preempt.signal if interrupted else None)

    def _finish(self, interrupted: bool, interrupt_signal: str | None = None) -> dict[str, Any]:
        acc, state = self.accelerator, self.state
        # The loop's last evaluation when it was of this step (a finished run always has one); an
        # interrupted run does not evaluate again (a preemption's grace period is short) and reports
        # its last evaluation, whichever step that was.
        last = self._last_eval
        if last is not None and (last[0] == state.step or interrupted):
            eval_step, final_eval = last
        elif interrupted:
            eval_step, final_eval = None, {"test_accuracy": None, "test_loss": None}  # JSON null
        else:
            eval_step, final_eval = state.step, self.evaluate()
        summary = {
            "test_accuracy": final_eval["test_accuracy"],
            "test_loss": final_eval["test_loss"],
            "evaluated_at_step": eval_step,
            "updates": state.step,
            "samples": state.samples,
            "epochs": self.epoch,
            "wall_time_s": state.wall_time_s,
            "curvature_time_s": state.curvature_time_s,
            "adversarial_time_s": state.adversarial_time_s,
            "curvature_checks": state.checks,
            "max_batch_size": state.max_batch_size,
            "final_train_loss": state.last_loss,
            "interrupted": interrupted,
            "interrupt_signal": interrupt_signal,
            "num_params": self.num_params,
            **self._launch(),  # processes, deepspeed_zero_stage: what a checkpoint's launch.json holds
            "cpu_malloc_tuned": self.malloc_tuned,
            "strategy": self.cfg.strategy,
            "model": self.cfg.model,
            "dataset": self.cfg.dataset,
            "versions": self.versions,
        }
        # Under DeepSpeed the parameters are views of flat buffers (ZeRO-1/2) or shards (ZeRO-3):
        # Accelerate's get_state_dict gathers them, on every rank (a collective under ZeRO-3).
        ds_state = acc.get_state_dict(self.model) if self.engine is not None and not interrupted else None
        if acc.is_main_process:
            if not interrupted:
                from safetensors.torch import save_file, save_model

                path = str(self.out / "model.safetensors")
                if ds_state is None:
                    save_model(self.raw_model, path)  # handles tied weights
                else:
                    save_file({k: v.detach().contiguous().clone() for k, v in ds_state.items()}, path)
                if self.cfg.model.startswith("hf:"):
                    self._save_pretrained(ds_state)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            self._metrics.close()
            if self._tb is not None:
                self._tb.close()
        acc.wait_for_everyone()
        return summary

    def _save_pretrained(self, ds_state: dict | None) -> None:
        """An ``hf:`` model also as transformers saves it (``output_dir/hf_model``: config with the
        data set's class names, weights, and the image processor it came with), for
        ``from_pretrained``; ``model.safetensors`` holds the same weights under our wrappers' names."""
        net = self.raw_model.model.net  # Normalized -> _LogitsOnly -> the transformers model
        names = self.data.class_names or [str(i) for i in range(self.data.num_classes)]
        net.config.id2label = dict(enumerate(names))
        net.config.label2id = {n: i for i, n in enumerate(names)}
        target = self.out / "hf_model"
        state = None
        if ds_state is not None:  # DeepSpeed: the gathered state, under the wrappers' prefix
            prefix = "model.net."
            state = {k[len(prefix) :]: v for k, v in ds_state.items() if k.startswith(prefix)}
        net.save_pretrained(target, state_dict=state)
        source = hf_path(self.cfg.model[3:])
        try:
            from transformers import AutoImageProcessor

            AutoImageProcessor.from_pretrained(source, local_files_only=True).save_pretrained(target)
        except Exception:  # the model came without a processor: nothing to pass on
            pass

    def close(self) -> None:
        """Release model, optimizer and loaders before the process ends (a 2-process CPU run
        aborted at exit otherwise: DESIGN pitfalls)."""
        self.accelerator.wait_for_everyone()
        self._loader_iter = None
        self.model = self.optimizer = self.engine = self._raw_model = None
        if self._lock is not None:
            self._lock.close()  # releases the output_dir's lock
            self._lock = None
        self.accelerator.free_memory()
        gc.collect()


@contextlib.contextmanager
def _built_whole(accelerator):
    """Models are built whole and plain; under ZeRO-3 Accelerate's ``prepare`` partitions them,
    after the trainer has taken its blueprint for the checks. But Accelerate registers its ZeRO-3
    config with transformers as soon as the Accelerator exists (even with ``zero3_init_flag``
    false), and ``from_pretrained`` then builds an ``hf:`` model already partitioned
    (``deepspeed.zero.Init``): the classifier head, resized to the data set's classes, failed with a
    size mismatch, and the blueprint would have held empty weights. The registration is lifted while
    the model is built and put back after."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    registered = getattr(plugin, "dschf", None)
    if registered is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


@contextlib.contextmanager
def _own_forward(model: torch.nn.Module):
    """Run ``model`` with its own forward: Accelerate's native mixed precision patches
    ``model.forward`` with training's autocast (``unwrap_model`` keeps it), and inside it any
    autocast a check enters (``hessian_precision``) would be overridden."""
    wrapped = model.__dict__.get("forward") if "_original_forward" in model.__dict__ else None
    if wrapped is None:
        yield
        return
    model.forward = model._original_forward
    try:
        yield
    finally:
        model.forward = wrapped


def build_data_and_model(cfg: TrainConfig) -> tuple[DataBundle, torch.nn.Module]:
    """The run's data set and its (freshly initialised) model, as :class:`Trainer` builds them."""
    aug = cfg.augmentation
    if aug == "auto":
        aug = model_default_augmentation(cfg.model)
        if aug == "resized_crop_flip" and cfg.dataset != "imagenet":
            # ImageNet's 224-pixel crops fit ImageNet's folders only: other images get the paper's
            # augmentation for small images (trained at 224, tested at their own size before)
            aug = "crop_flip"
    data = build_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir or None,
        augmentation=aug,
        download=cfg.download,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        limit_train_samples=cfg.limit_train_samples or None,
    )
    model = build_model(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )
    _check_input_fits(model, cfg, data)
    return data, model


def _check_input_fits(model: torch.nn.Module, cfg: TrainConfig, data: DataBundle) -> None:
    """One zero image through the new model (eval mode, no gradient), so that a model too deep for
    the data set's images (AlexNet on 28x28 Fashion-MNIST) says so now, in one line, not at the
    first training step."""
    was_training = model.training
    x = torch.zeros(1, data.in_channels, data.image_size, data.image_size)
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError) as e:  # torch's shape errors; transformers' size check
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"model: {cfg.model} does not take {cfg.dataset}'s {data.in_channels}x{data.image_size}x"
            f"{data.image_size} images ({first})"
        ) from None
    finally:
        model.train(was_training)


def cache_lomo_check() -> None:
    """Accelerate's ``AcceleratedOptimizer.step`` asks ``is_lomo_available()`` twice a step, and its
    ``backward`` path once more where LOMO is in use: each an uncached ``importlib`` search of
    ``sys.path`` for the ``lomo_optim`` package (0.1-0.3 ms here). The answer cannot change during a
    run, so Accelerate's own function is wrapped in a cache, in the modules that call it. Idempotent;
    a later Accelerate without the function is left alone (``benchmarks/bench_trainer_overhead.py``)."""
    import accelerate.accelerator
    import accelerate.optimizer

    for module in (accelerate.optimizer, accelerate.accelerator):
        check = getattr(module, "is_lomo_available", None)
        if callable(check) and not hasattr(check, "cache_info"):
            module.is_lomo_available = functools.cache(check)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hessian_seed(cfg: TrainConfig, check: int, seed: int | None = None) -> int:
    """The seed of check number ``check``'s Hessian sample draw (``seed``, when given, instead)."""
    return cfg.seed * 1_000_003 + check if seed is None else seed


def hessian_draw(
    cfg: TrainConfig,
    n_train: int,
    check: int,
    *,
    samples: int | None = None,
    seed: int | None = None,
    world: int = 1,
    rank: int = 0,
) -> list[int]:
    """Rank ``rank``'s share of the seeded draw of ``samples`` (default ``hessian_samples``) training
    samples for check number ``check`` (0-based; ``seed`` overrides the seed it gives)."""
    n = min(cfg.hessian_samples if samples is None else samples, n_train)
    n -= n % world
    g = torch.Generator().manual_seed(hessian_seed(cfg, check, seed))
    idx = torch.randperm(n_train, generator=g)[:n].tolist()
    share = n // world
    return idx[rank * share : (rank + 1) * share]


def fetch_batches(dataset, indices: list[int], micro: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``dataset``'s samples at ``indices`` as micro-batches of at most ``micro``, on ``device``."""
    batches = []
    for i in range(0, len(indices), micro):
        x, y = collate_batch(_fetch(dataset, indices[i : i + micro]))
        batches.append((x.to(device), y.to(device)))
    return batches


def _fetch(dataset, indices: list[int]):
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return [dataset[i] for i in indices]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Library entry point: build, fit, close. Returns the summary (also in output_dir/summary.json)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
