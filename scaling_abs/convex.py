"""Theorem 1's convex experiment (paper Appendix A, Figure 3): binary logistic regression trained by
full-batch GD, SGD at batch 100 and ABS / ABSA with ``100 <= b_t <= 3200``, step ``b_t * eta0``.

The paper used the mushroom data set, which is not available offline. We use a real binary task
that is: two classes of Fashion-MNIST (default: class 1 "trouser" against class 9 "ankle boot",
12,000 training and 2,000 test images, pixels in [0, 1]); like mushroom, it is nearly linearly
separable, so the loss flattens (its top Hessian eigenvalue falls) as training goes on, which is
the regime ABS is made for. A harder pair (``--classes 7 9``, sneaker against ankle boot) keeps its
curvature: ABS then grows only through kappa and the linear rule's large steps make it oscillate. The model is ``w . x / ||x|| + b`` (rows
scaled to unit length inside the model, so FGSM's eps keeps its meaning on pixels and the loss is
smooth with ``L_g <= 1/4``) with an L2 term ``l2/2 ||w||^2`` that makes it strongly convex, as
Assumption 2 asks.

Every method is plain SGD (no momentum, as in the theorem) on the mean loss of its batch:

* ``gd``: the whole training set every iteration, step ``lr`` (the right panel varies it);
* ``sgd``: batch 100, step ``lr``;
* ``abs`` / ``absa``: :class:`~scaling_abs.schedules.AdaptiveBatchSize` with the paper's alpha = beta
  = 2, kappa = 10 and the linear rule (step ``lr * b_t / 100``, i.e. ``b_t * eta0`` with
  ``eta0 = lr / 100``); the top Hessian eigenvalue of the training loss comes from
  :func:`~scaling_abs.curvature.top_eigenvalue` every ``check_every`` samples. ABSA replaces
  ``gamma = 20 %`` of each batch with FGSM examples (eps = 0.005), gamma halved at each growth and
  zero from iteration ``tau`` = half of the run (Algorithm 1, line 21; the half is DESIGN.md's default,
  the paper gives no value).

    scaling-abs convex                          # writes runs/convex/{convex.json, convex.md, convex.png}
    scaling-abs convex --iterations 300 --classes 0 6 --out /tmp/convex
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scaling_abs import curvature
from scaling_abs.adversarial import mix_adversarial
from scaling_abs.batching import SampleOrder
from scaling_abs.config import SEED_LIMIT, check_output_dir
from scaling_abs.errors import UserError
from scaling_abs.schedules import AdaptiveBatchSize

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


@dataclass
class ConvexConfig:
    """Settings of the experiment (the paper's where it gives them)."""

    classes: tuple[int, int] = (1, 9)  # Fashion-MNIST class for label 0, for label 1
    data_dir: str = ""  # Fashion-MNIST folder; empty = Debian's package
    iterations: int = 1000  # optimizer steps of every method (the x axis of Figure 3)
    lr: float = 1.2  # eta0 of the paper for GD and SGD at batch 100
    gd_lrs: tuple[float, ...] = (1.2, 2.4, 4.8, 9.6)  # right panel: GD with other step sizes
    batch_size: int = 100  # SGD's batch and ABS's first batch
    max_batch_size: int = 3200  # ABS's B_max
    check_every: int = 3200  # training samples between eigenvalue checks
    hessian_iters: int = 20  # power iterations per check (tol 1e-3: the convex problem is cheap)
    alpha: float = 2.0
    beta: float = 2.0
    kappa: int = 10
    adv_fraction: float = 0.2
    adv_eps: float = 0.005
    l2: float = 1e-4
    seed: int = 0


@dataclass
class Curve:
    """One method's run: full training loss and test accuracy every ``log_every`` iterations."""

    name: str
    iterations: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    test_accuracy: float = float("nan")
    samples: int = 0
    seconds: float = 0.0
    diverged: bool = False


class UnitRowLinear(nn.Module):
    """``w . (x / ||x||) + b`` on flattened pixels: logistic regression with unit-length rows."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.linear(x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).squeeze(1)


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def load_pair(cfg: ConvexConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two Fashion-MNIST classes as float pixels in [0, 1] and 0/1 targets (train, test)."""
    from scaling_abs.data import FASHION_MNIST_DIR, read_fashion_mnist

    a, b = cfg.classes
    if a == b or not all(0 <= c < 10 for c in (a, b)):
        raise UserError(f"classes: two different Fashion-MNIST classes in 0..9, got {a} {b}")
    arrays = read_fashion_mnist(cfg.data_dir or FASHION_MNIST_DIR)

    def split(images, labels):
        labels = torch.from_numpy(labels.astype("int64"))
        keep = (labels == a) | (labels == b)
        x = torch.from_numpy(images.copy())[keep].float().div_(255).flatten(1)
        return x, (labels[keep] == b).long()

    return (
        *split(arrays["train_images"], arrays["train_labels"]),
        *split(arrays["test_images"], arrays["test_labels"]),
    )


class _Problem:
    """The data, the loss (mean BCE + L2) and its evaluation: shared by every method."""

    def __init__(self, cfg: ConvexConfig, x, y, x_test, y_test):
        self.cfg, self.x, self.y, self.x_test, self.y_test = cfg, x, y, x_test, y_test
        self.n = x.shape[0]
        # the Hessian "batch" of every check: the whole training set in chunks (exact, and cheap here)
        self.hessian_batches = [(x[i : i + 4000], y[i : i + 4000]) for i in range(0, self.n, 4000)]

    def loss(self, model: UnitRowLinear, batch) -> torch.Tensor:
        inputs, targets = batch
        return bce(model(inputs), targets) + 0.5 * self.cfg.l2 * model.linear.weight.pow(2).sum()

    @torch.no_grad()
    def train_loss(self, model: UnitRowLinear) -> float:
        return float(self.loss(model, (self.x, self.y)))  # sync point: logged

    @torch.no_grad()
    def test_accuracy(self, model: UnitRowLinear) -> float:
        return float(((model(self.x_test) > 0).long() == self.y_test).double().mean())  # sync point: logged


def run_method(problem: _Problem, name: str, lr: float, log_every: int = 1) -> Curve:
    """Train one method for ``cfg.iterations`` steps from zero weights; returns its curve."""
    cfg = problem.cfg
    torch.manual_seed(cfg.seed)
    model = UnitRowLinear(problem.x.shape[1]).to(problem.x.dtype)
    order = SampleOrder(problem.n, seed=cfg.seed)
    adaptive = name in ("abs", "absa")
    schedule = AdaptiveBatchSize(
        cfg.batch_size,
        cfg.max_batch_size,
        alpha=cfg.alpha,
        beta=cfg.beta,
        kappa=cfg.kappa,
        adv_fraction=cfg.adv_fraction if name == "absa" else 0.0,
        lr_scaling="linear",
    )
    curve = Curve(name if name not in ("gd",) else f"gd (lr {lr:g})")
    samples, next_check, checks = 0, cfg.check_every, 0
    t0 = time.perf_counter()
    for it in range(cfg.iterations + 1):
        if it % log_every == 0 or it == cfg.iterations:
            value = problem.train_loss(model)
            curve.iterations.append(it)
            curve.train_loss.append(value)
            curve.batch_size.append(problem.n if name == "gd" else schedule.batch_size)
            curve.lr.append(lr * (schedule.lr_scale if adaptive else 1.0))
            if not math.isfinite(value):
                curve.diverged = True
                break
        if it == cfg.iterations:
            break
        if name == "gd":
            x, y, b, step = problem.x, problem.y, problem.n, lr
        else:
            b = schedule.batch_size if adaptive else cfg.batch_size
            idx = torch.as_tensor(order.indices(samples, b))
            x, y = problem.x[idx], problem.y[idx]
            step = lr * schedule.lr_scale if adaptive else lr
            # gamma = 0 from iteration tau = half of the run (Algorithm 1, line 21; DESIGN.md's tau)
            gamma = schedule.adv_fraction if it < cfg.iterations // 2 else 0.0
            if gamma > 0:
                x = mix_adversarial(model, x, y, gamma, cfg.adv_eps, loss=bce)
        model.zero_grad(set_to_none=True)
        problem.loss(model, (x, y)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-step)
        samples += b
        if adaptive and samples >= next_check and schedule.wants_checks:
            next_check += cfg.check_every * (1 + (samples - next_check) // cfg.check_every)
            res = curvature.top_eigenvalue(
                model,
                problem.loss,
                problem.hessian_batches,
                max_iter=cfg.hessian_iters,
                tol=1e-3,
                seed=cfg.seed + checks,
            )
            checks += 1
            before = schedule.batch_size
            schedule.observe(res.eigenvalue)
            curve.checks.append(
                {
                    "iteration": it + 1,
                    "eigenvalue": res.eigenvalue,
                    "batch_before": before,
                    "batch_after": schedule.batch_size,
                }
            )
    curve.samples = samples
    curve.seconds = time.perf_counter() - t0
    curve.test_accuracy = problem.test_accuracy(model)
    return curve


def run(cfg: ConvexConfig, log_every: int = 1) -> dict:
    """Every method of Figure 3; returns the JSON-able result (config, curves)."""
    x, y, xt, yt = load_pair(cfg)
    problem = _Problem(cfg, x, y, xt, yt)
    curves = [run_method(problem, "gd", lr, log_every) for lr in dict.fromkeys((cfg.lr, *cfg.gd_lrs))]
    curves += [run_method(problem, m, cfg.lr, log_every) for m in ("sgd", "abs", "absa")]
    return {
        "config": asdict(cfg),
        "data": {
            "task": f"Fashion-MNIST {FASHION_MNIST_CLASSES[cfg.classes[0]]} (0) vs {FASHION_MNIST_CLASSES[cfg.classes[1]]} (1)",
            "train": int(x.shape[0]),
            "test": int(xt.shape[0]),
        },
        "curves": [asdict(c) for c in curves],
    }


def _iterations_to(curve: dict, target: float) -> int | None:
    return next((i for i, v in zip(curve["iterations"], curve["train_loss"]) if v <= target), None)


def table(result: dict) -> str:
    """Final training loss, iterations to reach SGD's final loss, samples, largest batch, test accuracy."""
    curves = result["curves"]
    sgd = next(c for c in curves if c["name"] == "sgd")
    target = sgd["train_loss"][-1]
    lines = [
        f"| method | final train loss | iterations to SGD's final loss ({target:.4f}) | samples | largest batch | growths | test acc. (%) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in curves:
        reach = _iterations_to(c, target)
        growths = sum(1 for k in c["checks"] if k["batch_after"] > k["batch_before"])
        lines.append(
            f"| {c['name']} | {c['train_loss'][-1]:.4f}{' (diverged)' if c['diverged'] else ''} | "
            f"{reach if reach is not None else '-'} | {c['samples']:,} | {max(c['batch_size']):,} | "
            f"{growths if c['checks'] else '-'} | {100 * c['test_accuracy']:.2f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """Figure 3: training loss against iterations; left GD (eta0) / SGD / ABS / ABSA, right GD's step sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for c in result["curves"]:
        is_gd = c["name"].startswith("gd")
        if not is_gd or c["name"] == f"gd (lr {cfg['lr']:g})":
            left.plot(c["iterations"], c["train_loss"], label=c["name"], lw=1)
        if is_gd or c["name"] in ("abs", "absa"):
            right.plot(c["iterations"], c["train_loss"], label=c["name"], lw=1)
    for ax, title in (
        (left, "GD, SGD (b = 100), ABS, ABSA"),
        (right, "ABS / ABSA against GD with other step sizes"),
    ):
        ax.set(xlabel="iteration", ylabel="training loss", yscale="log", title=title)
        ax.legend(fontsize=8)
    fig.suptitle(result["data"]["task"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    d = ConvexConfig()
    parser = argparse.ArgumentParser(
        prog="scaling-abs convex", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--classes", nargs=2, type=int, default=list(d.classes), metavar=("NEG", "POS"))
    parser.add_argument("--data-dir", default=d.data_dir)
    parser.add_argument("--iterations", type=int, default=d.iterations)
    parser.add_argument("--lr", type=float, default=d.lr, help="eta0 for GD and SGD (ABS: lr * b / 100)")
    parser.add_argument("--check-every", type=int, default=d.check_every, help="samples between checks")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default="runs/convex")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.check_every < 1:
        raise UserError(f"--check-every must be >= 1, got {args.check_every}")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir: no such directory: {args.data_dir}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    check_output_dir(args.out, "--out")  # now, not after the run
    cfg = ConvexConfig(
        classes=tuple(args.classes), data_dir=args.data_dir, iterations=args.iterations, lr=args.lr,
        check_every=args.check_every, seed=args.seed,
    )  # fmt: skip
    result = run(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convex.json").write_text(json.dumps(result, indent=1))
    text = f"# Convex experiment: {result['data']['task']}\n\n" + table(result) + "\n"
    (out / "convex.md").write_text(text)
    plot(result, out / "convex.png")
    print(text)
    print(f"written: {out}/convex.json, convex.md, convex.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
