"""The loop's promises: accumulation == one big batch, N processes == 1, resume == uninterrupted."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaling_abs.config import load_config
from scaling_abs.distributed import free_port
from scaling_abs.errors import UserError
from scaling_abs.trainer import (
    CURVATURE_STATE_FILE,
    DISTRIBUTED_VARIABLES,
    CurvatureState,
    Trainer,
    _checkpoints,
    _launch_settings,
    hessian_draw,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
# Small, fast, exact: fp32, a model without batch statistics, plain SGD.
BASE = {
    "model": "mlp",
    "limit_train_samples": 1024,
    "epochs": 0.5,
    "batch_size": 64,
    "max_batch_size": 256,
    "micro_batch_size": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "progress": False,
    "tensorboard": False,
    "hessian_samples": 128,
    "hessian_iters": 5,
    "eval_every": 0.25,
}


def run(tmp_path: Path, name: str, **overrides) -> tuple[dict, dict]:
    cfg = load_config(None, {**BASE, "output_dir": str(tmp_path / name), **overrides})
    summary = train(cfg)
    return summary, load_file(str(tmp_path / name / "model.safetensors"))


def assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * a[k].abs().max().item(), msg=k)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_checks(run: Path, reference: Path) -> None:
    """The two runs made the same number of checks (more than one), with eigenvalues within 1e-4."""
    eig, ref = ([r["eigenvalue"] for r in read_metrics(p) if r["kind"] == "check"] for p in (run, reference))
    assert len(eig) == len(ref) > 1
    torch.testing.assert_close(torch.tensor(eig), torch.tensor(ref), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("strategy", ["bl", "absa"])
def test_accumulation_equals_one_big_batch(tmp_path, strategy):
    """ABSA too: the FGSM rows are the global batch's, whatever its micro-batches (each rounding up
    its own share perturbed 4 of 16 rows, 25 % of every batch at gamma = 0.2)."""
    s1, w1 = run(tmp_path, "whole", strategy=strategy, micro_batch_size=64)
    s4, w4 = run(tmp_path, "micro", strategy=strategy, micro_batch_size=16)
    assert s1["updates"] == s4["updates"] == 8
    assert (s1["adversarial_time_s"] > 0) == (s4["adversarial_time_s"] > 0) == (strategy == "absa")
    assert_close(w1, w4, rtol=1e-5)


def test_outputs_and_batch_growth(tmp_path):
    # tau = 0.3 epochs: the first step after a growth comes before it (at 0.25); max_batch_size=512:
    # the last step (256) is below it, so its adversarial fraction of 0 is tau's doing
    kw = {
        "hessian_every": 128,
        "kappa": 1,
        "micro_batch_size": 32,
        "adv_stop_epoch": 0.3,
        "max_batch_size": 512,
    }
    summary, _ = run(tmp_path, "abs", strategy="absa", **kw)
    out = tmp_path / "abs"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    for key in (
        "test_accuracy",
        "updates",
        "samples",
        "wall_time_s",
        "curvature_time_s",
        "adversarial_time_s",
        "max_batch_size",
        "final_train_loss",
        "interrupted",
    ):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["interrupted"] is False
    # what the results depend on besides our code, as `scaling-abs --version` prints it
    import scaling_abs

    assert summary["versions"]["scaling_abs"] == scaling_abs.__version__
    assert summary["versions"]["torch"] == torch.__version__  # with its build: 2.13.0+cu130
    assert json.loads((out / "summary.json").read_text())["versions"] == summary["versions"]
    records = read_metrics(out)
    steps = [r for r in records if r["kind"] == "step"]
    checks = [r for r in records if r["kind"] == "check"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == summary["updates"] and evals and checks
    # kappa=1: every check after the first grows the batch
    assert checks[1]["batch_after"] == 2 * checks[1]["batch_before"]
    assert summary["max_batch_size"] == 256
    sizes = [r["batch_size"] for r in steps]
    assert sizes == sorted(sizes) and sizes[0] == 64
    # linear LR rule: lr / batch stays constant while the base schedule has not decayed
    assert {round(r["lr"] / r["batch_size"], 12) for r in steps} == {round(0.05 / 64, 12)}
    # adversarial fraction gamma = 0.2 is divided by omega = 2 at growth and is 0 from tau on
    before_tau = [r for r in steps if (r["samples"] - r["batch_size"]) / 1024 < 0.3]
    after_tau = [r for r in steps if (r["samples"] - r["batch_size"]) / 1024 >= 0.3]
    assert [(r["batch_size"], r["adv_fraction"]) for r in before_tau] == [(64, 0.2)] * 4 + [(128, 0.1)]
    assert after_tau and all(r["adv_fraction"] == 0 for r in after_tau)
    assert summary["curvature_time_s"] > 0 and summary["adversarial_time_s"] > 0
    # the paper's check: power iteration from a random start, over every parameter
    assert {(c["solver"], c["warm_start"]) for c in checks} == {("power", False)}
    assert {c["block_params"] for c in checks} == {summary["num_params"]}
    assert {c["kept_graphs"] for c in checks} == {0}  # two micro-batches on the CPU: fresh products


def test_lanczos_warm_started_checks_and_the_curvature_state(tmp_path):
    run(
        tmp_path,
        "warm",
        strategy="abs",
        hessian_every=128,
        kappa=1,
        hessian_solver="lanczos",
        hessian_warm_start=True,
    )
    checks = [r for r in read_metrics(tmp_path / "warm") if r["kind"] == "check"]
    assert len(checks) >= 2 and {c["solver"] for c in checks} == {"lanczos"}
    assert [c["warm_start"] for c in checks] == [False] + [True] * (len(checks) - 1)
    # warm-started power iteration is allowed, with a warning (it can stop on an old direction)
    cfg = load_config(None, {**BASE, "output_dir": str(tmp_path / "p"), "hessian_warm_start": True})
    with pytest.warns(UserWarning, match="use hessian_solver=lanczos"):
        Trainer(cfg).close()
    # ...at every run: Python's default filter shows a message once per code line, which would hide
    # it from a second run in the same process (a notebook, a sweep)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(2):
            Trainer(cfg).close()
    assert sum("use hessian_solver=lanczos" in str(w.message) for w in seen) == 2
    # the saved vector round-trips; a vector of other shapes (a changed block) means a cold start
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))]
    state = CurvatureState()
    assert state.start(params, seed=0) is None
    state.eigenvector = [torch.ones(3, 2), torch.ones(2)]
    restored = CurvatureState()
    restored.load_state_dict(state.state_dict())
    start = restored.start(params, seed=0)
    assert [t.shape for t in start] == [p.shape for p in params]
    restored.eigenvector = [torch.ones(6), torch.ones(2)]
    assert restored.start(params, seed=0) is None


def test_custom_rules_setting_reaches_the_checks_and_changes_no_estimate(tmp_path, monkeypatch):
    from scaling_abs import _second_order

    built = []
    original = _second_order._conv
    monkeypatch.setattr(_second_order, "_conv", lambda *a: built.append(1) or original(*a))
    eigenvalues = {}
    # both Hessian-batch layouts: one micro-batch (graph kept across products) and two (fresh graphs)
    for samples in (64, 128):
        for setting in ("true", "false"):
            built.clear()
            name = f"{setting}{samples}"
            kw = {"model": "cnn", "strategy": "abs", "hessian_every": 256, "hessian_samples": samples}
            run(tmp_path, name, hessian_custom_rules=setting, **kw)
            checks = [r for r in read_metrics(tmp_path / name) if r["kind"] == "check"]
            eigenvalues[name] = [c["eigenvalue"] for c in checks]
            assert bool(built) == (setting == "true"), name
        assert len(eigenvalues[f"true{samples}"]) >= 2
        assert eigenvalues[f"true{samples}"] == pytest.approx(eigenvalues[f"false{samples}"], rel=1e-4)


@pytest.mark.parametrize("setting, expected", [("auto", None), ("no", None), ("bf16", torch.bfloat16)])
def test_hessian_precision_picks_the_checks_autocast(tmp_path, monkeypatch, setting, expected):
    """Checks follow training's precision unless hessian_precision says otherwise (fp32 checks of a
    bf16 run: at a sharp point bf16 products read 28 % above fp32's, benchmarks/README.md, "On an H100")."""
    from scaling_abs import curvature

    seen = []
    original = curvature.top_eigenvalue
    monkeypatch.setattr(
        curvature, "top_eigenvalue", lambda *a, **k: seen.append(k["autocast_dtype"]) or original(*a, **k)
    )
    kw = {"strategy": "abs", "hessian_every": 256, "epochs": 0.25}
    run(tmp_path, setting, hessian_precision=setting, **kw)  # trains in fp32
    checks = [r for r in read_metrics(tmp_path / setting) if r["kind"] == "check"]
    assert checks and seen == [expected] * len(checks)
    assert {c["precision"] for c in checks} == {"bf16" if expected else "no"}


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fp32_checks_of_a_bf16_run(tmp_path, checkpoint):
    """A bf16 run with hessian_precision=no computes its checks in fp32: its last check (after the
    last step) equals an fp32 estimate on the saved weights and the same Hessian batch, which a bf16
    estimate does not. Own process: Accelerate keeps one mixed precision per process."""
    out = tmp_path / "bf16_run"
    settings = {
        **BASE,
        "model": "cnn",
        "strategy": "abs",
        "epochs": 0.25,
        "hessian_every": 128,
        "hessian_iters": 10,
        "hessian_tol": 0.0,
        "hessian_checkpoint": checkpoint,
        "mixed_precision": "bf16",
        "hessian_precision": "no",
        "output_dir": str(out),
    }
    args = [f"{k}={v}" for k, v in settings.items()]
    train_cmd = [sys.executable, "-m", "scaling_abs", "train", *args]
    proc = subprocess.run(train_cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checks = [r for r in read_metrics(out) if r["kind"] == "check"]
    assert len(checks) == 2 and {c["precision"] for c in checks} == {"no"}
    assert checks[-1]["samples"] == json.loads((out / "summary.json").read_text())["samples"]
    probe = [sys.executable, str(ROOT / "benchmarks" / "probe_bf16_eigenvalue.py"), str(out)]
    args = ["--check", "1", "--iters", "10", "--variants", "fp32", "bf16", "--out", str(tmp_path / "p.json")]
    proc = subprocess.run(
        [*probe, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads((tmp_path / "p.json").read_text())
    assert checks[-1]["eigenvalue"] == pytest.approx(probe["eig_fp32"], rel=1e-5)
    assert abs(checks[-1]["eigenvalue"] / probe["eig_bf16"] - 1) > 1e-4


def test_checkpointed_checks_give_the_same_run(tmp_path, monkeypatch):
    from scaling_abs import _segmented

    calls = []
    original = _segmented.SegmentedHVP.__call__
    monkeypatch.setattr(
        _segmented.SegmentedHVP, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    kw = {"model": "cnn", "strategy": "abs", "hessian_every": 256, "hessian_samples": 128}
    plain, w_plain = run(tmp_path, "plain", **kw)
    assert not calls
    ckpt, w_ckpt = run(tmp_path, "ckpt", hessian_checkpoint=True, **kw)
    assert calls  # the checks went through the chain
    assert {r["checkpoint"] for r in read_metrics(tmp_path / "ckpt") if r["kind"] == "check"} == {True}
    eig = {
        n: [r["eigenvalue"] for r in read_metrics(tmp_path / n) if r["kind"] == "check"]
        for n in ("plain", "ckpt")
    }
    assert len(eig["plain"]) >= 2
    assert eig["ckpt"] == pytest.approx(eig["plain"], rel=1e-4)
    assert ckpt["updates"] == plain["updates"]
    assert_close(w_plain, w_ckpt, rtol=1e-4)


def test_checkpointed_checks_need_a_model_with_a_chain(tmp_path, monkeypatch):
    from scaling_abs import curvature

    monkeypatch.setattr(curvature, "units_of", lambda model: None)  # as for an hf: model without one
    with pytest.raises(UserError, match="hessian_checkpoint: model mlp cannot be split"):
        run(tmp_path, "mlp", hessian_checkpoint=True)


def test_a_block_of_more_layers_than_the_model_has_is_refused(tmp_path):
    """last:99 on a 3-layer MLP was the whole Hessian, recorded as the block last:99."""
    from scaling_abs import curvature
    from scaling_abs.trainer import build_data_and_model

    layers = curvature.layer_count(build_data_and_model(load_config(None, BASE))[1])
    with pytest.raises(
        UserError, match=rf"^hessian_block: last:{layers + 1}, but model mlp has {layers} layers"
    ):
        run(tmp_path, "mlp", hessian_block=f"last:{layers + 1}")
    summary, _ = run(tmp_path, "fits", hessian_block=f"last:{layers}", strategy="abs", hessian_every=128)
    assert summary["curvature_checks"] > 0


def test_a_check_that_runs_out_of_memory_retries_smaller(tmp_path, monkeypatch):
    from scaling_abs import curvature

    original, calls = curvature.top_eigenvalue, []

    def tight(model, loss_fn, batches, **kw):  # fits only checkpointed, in micro-batches of <= 16
        calls.append((kw["reuse_graph"], bool(kw["checkpoint"]), max(len(b[1]) for b in batches)))
        if kw["reuse_graph"] is True or not kw["checkpoint"] or calls[-1][2] > 16:
            raise torch.OutOfMemoryError("simulated")
        return original(model, loss_fn, batches, **kw)

    monkeypatch.setattr(curvature, "top_eigenvalue", tight)
    kw = {"model": "cnn", "strategy": "abs", "hessian_every": 256, "hessian_reuse_graph": "true"}
    with pytest.warns(UserWarning, match="ran out of memory"):
        run(tmp_path, "oom", **kw)
    checks = [r for r in read_metrics(tmp_path / "oom") if r["kind"] == "check"]
    assert checks[0]["out_of_memory"] == [
        "it builds each micro-batch's graph afresh (hessian_reuse_graph=false)",
        "its products are checkpointed (hessian_checkpoint=true)",
        "its micro-batches hold 32 samples (hessian_micro_batch_size=32)",
        "its micro-batches hold 16 samples (hessian_micro_batch_size=16)",
    ]
    assert all(c["checkpoint"] and c["hessian_micro_batch_size"] == 16 for c in checks)
    assert all(c["out_of_memory"] == [] for c in checks[1:])  # the later checks start small
    assert len(checks) >= 2 and all(math.isfinite(c["eigenvalue"]) for c in checks)

    def never(*a, **k):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(curvature, "top_eigenvalue", never)
    with pytest.raises(torch.OutOfMemoryError) as info, pytest.warns(UserWarning, match="ran out of memory"):
        run(tmp_path, "hopeless", **kw, hessian_micro_batch_size=1, hessian_checkpoint=False)
    assert "hessian_micro_batch_size" in "".join(getattr(info.value, "__notes__", []))


AFRESH = "it builds each micro-batch's graph afresh (hessian_reuse_graph=false)"
CHECKPOINTED = "its products are checkpointed (hessian_checkpoint=true)"


@pytest.mark.parametrize(
    "fits, ladder",
    [
        (lambda kw, batches: not (kw["reuse_graph"] == "auto" and len(batches) > 1), [AFRESH]),
        (  # only checkpointed, in micro-batches of <= 8: "afresh" once (it came again after the
            # checkpoint lever, which sets reuse_graph back to auto and keeps no graph)
            lambda kw, batches: kw["checkpoint"] and max(len(b[1]) for b in batches) <= 8,
            [AFRESH, CHECKPOINTED, "its micro-batches hold 8 samples (hessian_micro_batch_size=8)"],
        ),
    ],
)
def test_on_cuda_running_out_of_memory_gives_up_kept_graphs_first_and_once(
    tmp_path, monkeypatch, fits, ladder
):
    """On CUDA ``hessian_reuse_graph=auto`` keeps several micro-batches' graphs while the memory
    holds them; a check that still runs out of memory gives that up first (the CPU stands in)."""
    from scaling_abs import curvature

    original = curvature.top_eigenvalue

    def tight(model, loss_fn, batches, **kw):
        if not fits(kw, batches):
            raise torch.OutOfMemoryError("simulated")
        return original(model, loss_fn, batches, **kw)

    monkeypatch.setattr(curvature, "top_eigenvalue", tight)
    monkeypatch.setattr(curvature, "MEASURED_DEVICES", ("cpu",))
    kw = {"model": "cnn", "strategy": "abs", "hessian_every": 256, "hessian_micro_batch_size": 16}
    with pytest.warns(UserWarning, match="ran out of memory"):
        run(tmp_path, "oom", **kw)
    checks = [r for r in read_metrics(tmp_path / "oom") if r["kind"] == "check"]
    assert checks[0]["out_of_memory"] == ladder
    assert all(c["out_of_memory"] == [] for c in checks[1:])


def test_the_largest_seed_runs_its_checks(tmp_path):
    """The check's augmentation seed (draw seed x 65,537 + rank) passed 2**64 from seed 281,469,837 on."""
    summary, _ = run(
        tmp_path, "seed", seed=2**32 - 1, strategy="abs", hessian_every=256, augmentation="crop_flip"
    )
    assert summary["curvature_checks"] >= 1


def _preempted_at(step: int, cfg, monkeypatch, signum=signal.SIGTERM) -> dict:
    """``train(cfg)`` with ``signum`` raised at the end of optimizer step ``step``."""
    original, calls = Trainer._train_step, {"n": 0}

    def step_then_sigterm(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", step_then_sigterm)
    try:
        return train(cfg)
    finally:
        monkeypatch.setattr(Trainer, "_train_step", original)


def test_preemption_checkpoint_and_resume_match_uninterrupted(tmp_path, monkeypatch):
    # a check at step 2, before the preemption at step 3: the checkpoint carries its eigenvector
    common = {
        "strategy": "abs",
        "hessian_every": 128,
        "kappa": 1,
        "micro_batch_size": 32,
        "hessian_solver": "lanczos",
        "hessian_warm_start": True,
    }
    full, w_full = run(tmp_path, "full", **common)

    out = tmp_path / "preempted"
    # handled: checkpoint at the step boundary, stop
    first = _preempted_at(3, load_config(None, {**BASE, **common, "output_dir": str(out)}), monkeypatch)
    assert first["interrupted"] is True and first["updates"] == 3
    assert [p.name for p in _checkpoints(out)] == ["step_3"]

    resumed = train(load_config(None, {**BASE, **common, "output_dir": str(out), "resume": "auto"}))
    assert (resumed["updates"], resumed["samples"]) == (full["updates"], full["samples"])
    assert resumed["max_batch_size"] == full["max_batch_size"]
    assert_close(w_full, load_file(str(out / "model.safetensors")), rtol=1e-6)
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "step"]
    assert steps == list(range(1, full["updates"] + 1))  # no step logged twice
    # the resumed checks warm-start from the saved vector: the same estimates, bit for bit
    keys = ("step", "eigenvalue", "iterations", "warm_start")
    checks = [
        [tuple(r[k] for k in keys) for r in read_metrics(d) if r["kind"] == "check"]
        for d in (tmp_path / "full", out)
    ]
    assert checks[0] == checks[1] and len(checks[0]) >= 3
    assert [c[3] for c in checks[0]] == [False] + [True] * (len(checks[0]) - 1)
    # a checkpoint without the curvature state (an older scaling_abs wrote it): one clear error
    old = _checkpoints(out)[-1]
    (old / CURVATURE_STATE_FILE).unlink()
    with pytest.raises(UserError, match="older scaling_abs"):
        train(load_config(None, {**BASE, **common, "output_dir": str(out), "resume": str(old)}))


def test_ctrl_c_checkpoints_like_sigterm_and_the_exit_code_says_so(tmp_path, monkeypatch):
    from scaling_abs.cli import interrupted_exit_code

    out = tmp_path / "run"
    kw = {**BASE, "output_dir": str(out)}
    summary = _preempted_at(2, load_config(None, kw), monkeypatch, signal.SIGINT)
    assert summary["interrupted"] is True and summary["interrupt_signal"] == "SIGINT"
    assert summary["updates"] == 2 and [p.name for p in _checkpoints(out)] == ["step_2"]
    assert interrupted_exit_code(summary) == 130
    assert interrupted_exit_code({**summary, "interrupt_signal": "SIGTERM"}) == 143
    assert interrupted_exit_code({"interrupted": False}) == 0
    # no evaluation at the stop (a grace period is short): the summary has the last one, if any
    assert summary["evaluated_at_step"] is None and summary["test_accuracy"] is None  # JSON null


def test_a_signal_while_the_outputs_are_written_waits_for_them(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_finish, evaluations = Trainer._finish, []
    original_evaluate = Trainer.evaluate

    def finish_after_sigterm(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)  # the loop is over: nothing to stop any more
        return original_finish(self, *args)

    def counted(self):
        evaluations.append(self.state.step)
        return original_evaluate(self)

    monkeypatch.setattr(Trainer, "_finish", finish_after_sigterm)
    monkeypatch.setattr(Trainer, "evaluate", counted)
    summary = train(load_config(None, {**BASE, "output_dir": str(out)}))
    assert summary["interrupted"] is False and summary["interrupt_signal"] is None
    assert (out / "model.safetensors").exists() and json.loads((out / "summary.json").read_text())
    # the loop's evaluation at the last step is the summary's: the test set is not read twice
    assert len(evaluations) == len(set(evaluations)) and summary["evaluated_at_step"] == evaluations[-1]


def test_random_augmentation_resumes_exactly(tmp_path, monkeypatch):
    """Crops and flips come from each micro-batch's own seed: a resumed run (a DataLoader iterator
    more) draws the same ones. Before, the loss parted from the uninterrupted run's at the first
    step after the resume."""
    kw = {**BASE, "augmentation": "crop_flip", "micro_batch_size": 32}
    full, w_full = run(tmp_path, "full", **kw)
    out = tmp_path / "preempted"
    first = _preempted_at(3, load_config(None, {**kw, "output_dir": str(out)}), monkeypatch)
    assert first["interrupted"] is True
    resumed = train(load_config(None, {**kw, "output_dir": str(out), "resume": "auto"}))
    assert resumed["final_train_loss"] == full["final_train_loss"]
    assert_close(w_full, load_file(str(out / "model.safetensors")), rtol=1e-6)


def test_channels_last_training_is_the_same_run_and_resumes(tmp_path, monkeypatch):
    """channels_last=true: the model's convolution weights and the data in the channels-last memory
    format; the same steps as the default layout (rounding aside), the same run with FGSM and checks,
    and a preempted channels-last run resumes to the uninterrupted one."""
    kw = {"model": "cnn", "hessian_every": 256, "hessian_samples": 128, "micro_batch_size": 32}
    layouts = []
    original = Trainer._train_step

    def spy(self, *args):
        conv = [p for p in self.raw_model.parameters() if p.dim() == 4][-1]  # 16 input channels
        layouts.append(conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous())
        return original(self, *args)

    # two SGD steps: the layouts sum in other orders, and BatchNorm's bias gradient is a sum over
    # the whole feature map that mostly cancels, so its rounding shows most (2e-3 of the largest
    # entry after one step with one thread); the weights agree to 1e-4 of theirs
    two = {**kw, "epochs": 0.125}
    _, w_plain = run(tmp_path, "plain", strategy="bl", **two)
    monkeypatch.setattr(Trainer, "_train_step", spy)
    _, w_cl = run(tmp_path, "cl", strategy="bl", channels_last=True, **two)
    assert layouts and all(layouts)
    biases = {k for k in w_plain if k.endswith(".bias") and w_plain[k].dim() == 1 and "running" not in k}
    assert_close({k: w_plain[k] for k in biases}, {k: w_cl[k] for k in biases}, rtol=2e-2)
    rest = w_plain.keys() - biases
    assert_close({k: w_plain[k] for k in rest}, {k: w_cl[k] for k in rest}, rtol=1e-3)
    # a whole ABSA run (FGSM under the layout, checks on the channels-last model): the same course
    plain, _ = run(tmp_path, "plain_absa", strategy="absa", **kw)
    cl, _ = run(tmp_path, "cl_absa", strategy="absa", channels_last=True, **kw)
    assert (cl["updates"], cl["max_batch_size"]) == (plain["updates"], plain["max_batch_size"])
    eig = [
        [r["eigenvalue"] for r in read_metrics(tmp_path / n) if r["kind"] == "check"]
        for n in ("plain_absa", "cl_absa")
    ]
    assert len(eig[0]) >= 2 and eig[1] == pytest.approx(eig[0], rel=3e-2)  # 1.3 % seen: FGSM signs

    full, w_full = run(tmp_path, "full", strategy="abs", channels_last=True, **kw)
    out = tmp_path / "preempted"
    cfg = load_config(None, {**BASE, **kw, "strategy": "abs", "channels_last": True, "output_dir": str(out)})
    assert _preempted_at(3, cfg, monkeypatch)["interrupted"] is True
    resumed = train(load_config(None, {**BASE, **kw, "strategy": "abs", "channels_last": True,
                                       "output_dir": str(out), "resume": "auto"}))  # fmt: skip
    assert resumed["updates"] == full["updates"]
    assert_close(w_full, load_file(str(out / "model.safetensors")), rtol=1e-6)


def test_half_written_checkpoints_are_never_picked_up(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_12").mkdir(parents=True)
    (root / "step_9").mkdir()  # no trainer_state.json: the rename never happened
    (root / "step_4").mkdir()
    (root / "step_4" / "trainer_state.json").write_text("{}")
    assert [p.name for p in _checkpoints(tmp_path)] == ["step_4"]


def test_resume_errors_a_user_can_cause(tmp_path):
    """Resuming with another model is one clear error; a metrics.jsonl cut short mid-line (a run
    killed while writing it) is repaired, not a crash."""
    out = tmp_path / "run"
    kw = {**BASE, "epochs": 0.125, "checkpoint_every": 1, "output_dir": str(out)}
    first = train(load_config(None, kw))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "st')
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        again = train(load_config(None, {**kw, "epochs": 0.25, "resume": "auto"}))
    assert again["updates"] == 2 * first["updates"]
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())
    for change in ({"model": "cnn"}, {"strategy": "bl"}, {"batch_size": 128}):
        with pytest.raises(UserError, match=r"^resume: .* was written with .* this run has"):
            train(load_config(None, {**kw, **change, "epochs": 0.5, "resume": "auto"}))
    # a DeepSpeed checkpoint (its optimizer state saved per rank) resumes on its stage and processes
    ckpt = _checkpoints(out)[-1]
    assert json.loads((ckpt / "launch.json").read_text()) == {"processes": 1, "deepspeed_zero_stage": None}
    (ckpt / "launch.json").write_text(json.dumps({"processes": 2, "deepspeed_zero_stage": 2}))
    with pytest.raises(
        UserError,
        match=r"^resume: .* was written by 2 processes, DeepSpeed ZeRO stage 2, this run has 1 processes, "
        r"DeepSpeed ZeRO stage None \(None: no DeepSpeed\)",
    ):
        train(load_config(None, {**kw, "epochs": 0.5, "resume": "auto"}))
    (ckpt / "launch.json").write_text(json.dumps({"processes": 1, "deepspeed_zero_stage": None}))
    # a checkpoint from before its settings were saved in it: the state dicts still catch another model
    for ckpt in _checkpoints(out):
        (ckpt / "run_config.yaml").unlink()
    with pytest.raises(UserError, match=r"^resume: .* does not fit this run's model"):
        train(load_config(None, {**kw, "model": "cnn", "epochs": 0.5, "resume": "auto"}))


def test_a_fresh_run_replaces_a_finished_one_and_refuses_an_unfinished_one(tmp_path, monkeypatch):
    """Found by the preemption audit: a fresh run into a used folder kept the old run's checkpoints
    (and pruned its own), so a later resume=auto silently continued the other run."""
    out = tmp_path / "run"
    kw = {**BASE, "output_dir": str(out)}
    first = train(load_config(None, kw))
    metrics = (out / "metrics.jsonl").read_text()
    # resume=auto on the finished run: its summary, no work and no writes
    assert train(load_config(None, {**kw, "resume": "auto"})) == first
    assert (out / "metrics.jsonl").read_text() == metrics
    # a fresh run with other settings moves it to previous_run/
    with pytest.warns(UserWarning, match="held a finished run: moved to"):
        _preempted_at(2, load_config(None, {**kw, "batch_size": 128}), monkeypatch)
    assert [p.name for p in _checkpoints(out)] == ["step_2"]  # the finished run's are not among them
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert json.loads((out / "previous_run" / "summary.json").read_text()) == first
    assert _checkpoints(out / "previous_run")[-1].name == f"step_{first['updates']}"
    # ... and that interrupted run is not replaced by another fresh one
    with pytest.raises(UserError, match="^output_dir: .* holds an unfinished run"):
        train(load_config(None, kw))
    resumed = train(load_config(None, {**kw, "batch_size": 128, "resume": "auto"}))
    assert resumed["samples"] == first["samples"] and resumed["updates"] == first["updates"] // 2
    # a finished run whose last checkpoint is before its end (older code did not always write one
    # there) is still a finished run
    for ckpt in _checkpoints(out)[1:]:
        shutil.rmtree(ckpt)
    with pytest.warns(UserWarning, match="held a finished run"):
        train(load_config(None, kw))


def test_raw_model_is_what_accelerate_unwraps(tmp_path):
    cfg = {**BASE, "strategy": "absa", "adv_decay_on": "drop", "output_dir": str(tmp_path / "run")}
    trainer = Trainer(load_config(None, cfg))
    try:
        assert trainer.raw_model is trainer.accelerator.unwrap_model(trainer.model)
        assert trainer.schedule.adv_decay_on == "drop"  # the setting reaches the schedule
    finally:
        trainer.close()


def test_a_check_s_augmented_images_are_seeded_by_the_check(tmp_path):
    """With augmentation a check's Hessian batch is augmented as in training, from a generator
    seeded by the draw: the same check gives the same images, another check others, and the
    global random state is left alone (the augmentation drew from it: two draws of one check gave
    3.46 and 4.02 on the same weights)."""
    cfg = {**BASE, "augmentation": "crop_flip", "output_dir": str(tmp_path / "run")}
    trainer = Trainer(load_config(None, cfg))
    try:
        before = torch.get_rng_state()
        first, again = trainer._hessian_batches(), trainer._hessian_batches()
        assert torch.equal(torch.get_rng_state(), before)
        for (x1, y1), (x2, y2) in zip(first, again):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        plain = trainer.data.train.images[hessian_draw(trainer.cfg, trainer.n_train, 0)[:64]].float() / 255
        assert not torch.equal(first[0][0].reshape(plain.shape), plain)  # augmented, as in training
        trainer.state.checks += 1
        assert not torch.equal(trainer._hessian_batches()[0][0], first[0][0])
    finally:
        trainer.close()


def test_a_model_too_deep_for_the_images_is_a_user_error():
    from scaling_abs.trainer import build_data_and_model

    with pytest.raises(UserError, match=r"^model: i2 does not take fashion_mnist's 1x28x28 images"):
        build_data_and_model(load_config(None, {"model": "i2", "limit_train_samples": 64}))


def test_the_launch_environment(monkeypatch):
    """accelerate launch with a DeepSpeed config but no deepspeed= ran a plain run, silently; a
    partial multi-process environment was Accelerate's traceback; DeepSpeed without a launcher
    looked for MPI."""
    for name in (*DISTRIBUTED_VARIABLES, "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # absent now, and absent again after the test
    plain = load_config(None, {})
    assert _launch_settings(plain) is plain and "RANK" not in os.environ
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(
        UserError, match="^deepspeed: launched with an Accelerate DeepSpeed config that names no"
    ):
        _launch_settings(plain)
    ds_file = str(ROOT / "ds_configs" / "zero2.json")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ds_file)
    launched = _launch_settings(plain)
    assert launched.deepspeed == ds_file and plain.deepspeed == ""
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(
        UserError, match="^launch: WORLD_SIZE=2 but MASTER_ADDR not set; start the processes with"
    ):
        _launch_settings(plain)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="^launch: WORLD_SIZE must be a process count"):
        _launch_settings(plain)


def test_a_deepspeed_file_that_is_not_an_object(tmp_path):
    from scaling_abs.batching import make_plan
    from scaling_abs.trainer import _deepspeed_config

    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        _deepspeed_config(load_config(None, {"deepspeed": str(path)}), make_plan(128, 128))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"train_batch_size": 256}, r"train_batch_size in .* is 256, the run's is 128 \(from the first plan"),
        (
            {"train_micro_batch_size_per_gpu": 16},
            "train_micro_batch_size_per_gpu in .* is 16, the run's is 64",
        ),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps in .* is 4, the run's is 2"),
        ({"gradient_clipping": 1.0}, r"gradient_clipping in .* is 1.0, the run's is 0.0 \(from grad_clip\)"),
        ({"optimizer": {"type": "Adam"}}, r"\S+ names an optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, r"\S+ names a scheduler"),
        (
            {"zero_force_ds_cpu_optimizer": True},
            "zero_force_ds_cpu_optimizer true in .* replaces the run's SGD",
        ),
    ],
)
def test_deepspeed_settings_that_would_change_the_run_are_refused(tmp_path, settings, message):
    """DeepSpeed's explicit batch values won over ours: a traceback, or (consistent among themselves)
    another accumulation count, silently; an optimizer there is not the method's SGD."""
    from scaling_abs.batching import make_plan
    from scaling_abs.trainer import _deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()), **settings}))
    with pytest.raises(UserError, match="^deepspeed: " + message):
        _deepspeed_config(load_config(None, {"deepspeed": str(path)}), make_plan(128, 64))
    same = {"train_batch_size": 128, "train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 2}
    path.write_text(json.dumps(same))  # explicit and equal to the plan: taken
    ds = _deepspeed_config(load_config(None, {"deepspeed": str(path)}), make_plan(128, 64))
    assert {k: ds[k] for k in same} == same and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.slow
def one_deepspeed_process(out: Path, overrides: dict) -> None:
    """``_dist_train_worker.py`` as one plain process, writing into ``out``: no launcher and none of
    RANK, WORLD_SIZE, MASTER_*, so the trainer gives DeepSpeed a one-process group on the loopback
    address (it looked for MPI, and failed)."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    config = {**overrides, "output_dir": str(out)}
    cmd = [sys.executable, str(ROOT / "tests" / "_dist_train_worker.py"), json.dumps(config), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(out: Path, overrides: dict) -> None:
    """``_dist_train_worker.py`` under torchrun with 2 processes, writing into ``out``."""
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(ROOT / "tests" / "_dist_train_worker.py"),
        json.dumps({**overrides, "output_dir": str(out)}), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    overrides = {
        **BASE,
        "strategy": "absa",
        "hessian_every": 128,
        "kappa": 1,
        "micro_batch_size": 16,
        "hessian_iters": 10,
        "hessian_tol": 0.0,
    }
    one, w_one = run(tmp_path, "one", **overrides)
    out = tmp_path / "two"
    two_processes(out, overrides)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    # the ranks really synchronised (a silent no-sync run would differ here)
    assert_close(r0, r1, rtol=0.0)
    assert_close(w_one, r0, rtol=1e-4)
    two = json.loads((out / "summary.json").read_text())
    assert (two["updates"], two["samples"], two["processes"]) == (one["updates"], one["samples"], 2)
    assert_same_checks(out, tmp_path / "one")


def test_two_processes_share_one_set_of_batchnorm_statistics(tmp_path):
    """Each rank updated BatchNorm's running statistics from its own micro-batches: at every check
    (and FGSM, and evaluation under DeepSpeed: all in eval mode) each rank had another model. They
    are averaged after every step."""
    overrides = {
        **BASE,
        "model": "cnn",
        "strategy": "absa",
        "hessian_every": 256,
        "kappa": 1,
        "micro_batch_size": 16,
    }
    out = tmp_path / "two"
    two_processes(out, overrides)
    b0, b1 = (json.loads((out / f"rank{r}_check_buffers.json").read_text()) for r in (0, 1))
    assert len(b0) == len(b1) >= 2 and len(b0[0]) == 6  # the input normalisation, two BatchNorms
    assert b0 == b1  # the same to the last bit
    assert_close(*(torch.load(out / f"rank{r}.pt") for r in (0, 1)), rtol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("ds_file, stage", [("zero2.json", 2), ("zero3_offload.json", 3)])
def test_deepspeed_zero2_trains_like_the_plain_run(tmp_path, ds_file, stage):
    """ZeRO-2 with SGD, batch growth included, against the plain Accelerate run (1e-4 relative). The
    micro-batch grows with the batch (64, 128, 256: below micro_batch_size), and DeepSpeed must know:
    it divides each micro-batch's loss by the accumulation count it derives from it (0.45 off).
    ZeRO-3 with offloaded optimizer states too: Accelerate swapped the SGD for DeepSpeed's CPU Adam
    there (15x off, diverging)."""
    pytest.importorskip("deepspeed")
    overrides = {**BASE, "strategy": "abs", "hessian_every": 128, "kappa": 1, "micro_batch_size": 512}
    plain, w_plain = run(tmp_path, "plain", **overrides)
    out = tmp_path / "zero2"
    one_deepspeed_process(out, {**overrides, "deepspeed": str(ROOT / "ds_configs" / ds_file)})
    zero2 = json.loads((out / "summary.json").read_text())
    assert (zero2["updates"], zero2["samples"], zero2["max_batch_size"]) == (
        plain["updates"],
        plain["samples"],
        plain["max_batch_size"],
    )
    assert zero2["max_batch_size"] > 64  # the batch grew through engine.set_train_batch_size
    assert (
        zero2["deepspeed_zero_stage"] == stage and plain["deepspeed_zero_stage"] is None
    )  # really DeepSpeed
    assert_close(w_plain, load_file(str(out / "model.safetensors")), rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_bf16_trains_absa(tmp_path):
    """DeepSpeed's bf16 keeps the weights in bf16 with no autocast: the fp32 inputs met bf16 weights
    ("mat1 and mat2 must have the same dtype") at the first forward, FGSM's or training's. The
    model's input now follows its weights (the data and FGSM's perturbation stay fp32)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "bf16"
    overrides = {**BASE, "strategy": "absa", "hessian_every": 256, "mixed_precision": "bf16"}
    one_deepspeed_process(out, {**overrides, "deepspeed": str(ROOT / "ds_configs" / "zero2.json")})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deepspeed_zero_stage"] == 2 and summary["adversarial_time_s"] > 0
    assert math.isfinite(summary["final_train_loss"]) and summary["test_accuracy"] > 0.5
    checks = [r for r in read_metrics(out) if r["kind"] == "check"]
    assert checks and all(c["finite"] and c["precision"] == "bf16" for c in checks)


@pytest.mark.slow
def test_deepspeed_zero3_two_processes_train_like_one_plain_process(tmp_path):
    """ZeRO-3 partitions the parameters over 2 processes; ABSA's FGSM, curvature checks (on a gathered
    copy) and batch growth must still give the one-process run's eigenvalues and weights."""
    pytest.importorskip("deepspeed")
    overrides = {
        **BASE, "strategy": "absa", "hessian_every": 128, "kappa": 1, "micro_batch_size": 32,
        "hessian_tol": 0.0,
    }  # fmt: skip
    plain, w_plain = run(tmp_path, "plain", **overrides)
    out = tmp_path / "zero3"
    two_processes(out, {**overrides, "deepspeed": str(ROOT / "ds_configs" / "zero3.json")})
    zero3 = json.loads((out / "summary.json").read_text())
    assert zero3["deepspeed_zero_stage"] == 3 and zero3["processes"] == 2
    assert (zero3["updates"], zero3["samples"], zero3["max_batch_size"]) == (
        plain["updates"],
        plain["samples"],
        plain["max_batch_size"],
    )
    assert zero3["max_batch_size"] > 64
    assert_same_checks(out, tmp_path / "plain")
    # model.safetensors holds the gathered weights, not the ranks' shards
    assert_close(w_plain, load_file(str(out / "model.safetensors")), rtol=1e-4)


def test_one_run_per_output_dir_at_a_time(tmp_path):
    """A second run in a folder that a run holds is refused (two at once wrote one metrics.jsonl
    with duplicated steps); half-written checkpoint folders a kill left are cleared."""
    import fcntl

    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step_7").mkdir(parents=True)
    holder = open(out / ".lock", "a+")  # another run holding the folder
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("pid 12345\n")
    holder.flush()
    with pytest.raises(UserError, match=r"^output_dir: .* is in use by another run \(pid 12345\)"):
        train(load_config(None, {**BASE, "output_dir": str(out)}))
    holder.close()  # that run ended
    train(load_config(None, {**BASE, "output_dir": str(out)}))
    assert not (out / "checkpoints" / ".tmp-step_7").exists()
    train(load_config(None, {**BASE, "output_dir": str(out), "resume": "auto"}))  # released at close


def test_a_resumed_run_drops_tensorboard_events_past_its_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    kw = {**BASE, "tensorboard": True, "output_dir": str(out)}
    first = _preempted_at(3, load_config(None, kw), monkeypatch)
    # a run killed after it logged past its last checkpoint (as kill -9 leaves it)
    ghost = SummaryWriter(str(out / "tensorboard"))
    ghost.add_scalar("step/loss", -1.0, first["samples"] + 64)
    ghost.close()
    train(load_config(None, {**kw, "resume": "auto"}))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("step/loss")
    assert all(e.value >= 0 for e in losses)  # the ghost is gone
    steps = [e.step for e in losses]
    assert steps == sorted(set(steps))


def test_a_restart_before_any_checkpoint_drops_the_killed_run_s_tensorboard_events(tmp_path):
    """A run killed before its first checkpoint starts again from 0: metrics.jsonl's records went,
    its TensorBoard points stayed (every step plotted twice)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    ghost = SummaryWriter(str(out / "tensorboard"))  # as kill -9 leaves it: events, no checkpoint
    for samples in (64, 128, 192):
        ghost.add_scalar("step/loss", -1.0, samples)
    ghost.close()
    train(load_config(None, {**BASE, "tensorboard": True, "output_dir": str(out), "resume": "auto"}))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("step/loss")
    assert losses and all(e.value >= 0 for e in losses)
    assert [e.step for e in losses] == sorted({e.step for e in losses})


def test_the_progress_bar_shows_the_step_it_counts(tmp_path, capsys, monkeypatch):
    """Each drawing of the bar shows the epoch, batch, lr and loss of the step its counter has just
    counted; they were the step before's (set after the counter's update had drawn)."""
    import tqdm.auto

    class EveryUpdate(tqdm.auto.tqdm):  # draws at every update
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", EveryUpdate)
    out = tmp_path / "run"
    overrides = {**BASE, "progress": True, "epochs": 1, "strategy": "bl", "output_dir": str(out)}
    train(load_config(None, overrides))
    drawn = [
        (float(m[1]), float(m[2]))
        for m in re.finditer(r"\| ([0-9.]+)/1\.02k \[[^\]]*epoch=([0-9.]+)", capsys.readouterr().err)
    ]
    assert {n for n, _ in drawn} == set(range(0, 1024, 64))  # the start and each step (the last: 1.02k)
    assert all(abs(epoch - n / 1024) < 0.006 for n, epoch in drawn), drawn


def _hf_model_and_images(tmp_path: Path, save_tiny_vit):
    """A saved 2-class ViT with its processor (``tmp_path/vit``) and a saved 3-class image set
    (``tmp_path/set``: 32 images of 3x8x8): the run's config keys for them, and transformers."""
    transformers = save_tiny_vit(tmp_path / "vit", 2)
    datasets = pytest.importorskip("datasets")
    transformers.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path / "vit"
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(32)]
    features = datasets.Features(
        {
            "image": datasets.Array3D((8, 8, 3), "uint8"),
            "label": datasets.ClassLabel(names=["ant", "bee", "cat"]),
        }
    )
    split = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(32)]}, features=features
    )
    datasets.DatasetDict({"train": split, "test": split.select(range(8))}).save_to_disk(str(tmp_path / "set"))
    keys = {
        "model": f"hf:{tmp_path / 'vit'}",
        "dataset": "hf:set",
        "data_dir": str(tmp_path / "set"),
        "limit_train_samples": 0,
        "hessian_samples": 16,
    }
    return keys, transformers


def test_an_hf_model_is_saved_for_from_pretrained(tmp_path, save_tiny_vit):
    """An hf: run also writes output_dir/hf_model: transformers loads it with the data set's class
    names and the trained weights (model.safetensors has them under our wrappers' names)."""
    keys, transformers = _hf_model_and_images(tmp_path, save_tiny_vit)
    out = tmp_path / "run"
    train(load_config(None, {**BASE, **keys, "output_dir": str(out)}))
    loaded = transformers.ViTForImageClassification.from_pretrained(out / "hf_model")
    assert loaded.config.id2label == {0: "ant", 1: "bee", 2: "cat"} and loaded.config.num_labels == 3
    ours = load_file(str(out / "model.safetensors"))
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ours[f"model.net.{name}"], rtol=0, atol=0)
    processor = transformers.AutoImageProcessor.from_pretrained(out / "hf_model")
    assert list(processor.image_mean) == [0.5] * 3


@pytest.mark.slow
def test_an_hf_model_trains_under_deepspeed_zero3(tmp_path, save_tiny_vit):
    """Accelerate registers its ZeRO-3 config with transformers as soon as the Accelerator exists,
    and from_pretrained then built the model partitioned: the head resized to the data set's 3
    classes failed ("size mismatch for classifier.weight"). Built whole, the ZeRO-3 run starts from
    the pretrained weights and trains as the plain run does, and hf_model holds the gathered weights."""
    pytest.importorskip("deepspeed")
    keys, transformers = _hf_model_and_images(tmp_path, save_tiny_vit)
    overrides = {
        **BASE,
        **keys,
        "strategy": "absa",
        "epochs": 2,
        "hessian_every": 16,
        "batch_size": 8,
        "micro_batch_size": 8,
    }
    plain, w_plain = run(tmp_path, "plain", **overrides)
    out = tmp_path / "zero3"
    one_deepspeed_process(out, {**overrides, "deepspeed": str(ROOT / "ds_configs" / "zero3.json")})
    zero3 = json.loads((out / "summary.json").read_text())
    assert zero3["deepspeed_zero_stage"] == 3
    assert (zero3["updates"], zero3["samples"]) == (plain["updates"], plain["samples"])
    assert_same_checks(out, tmp_path / "plain")
    assert_close(w_plain, load_file(str(out / "model.safetensors")), rtol=1e-4)
    loaded = transformers.ViTForImageClassification.from_pretrained(out / "hf_model")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, w_plain[f"model.net.{name}"], rtol=1e-4, atol=1e-6)


def test_accelerate_s_lomo_check_is_asked_once():
    """Accelerate's optimizer step searched sys.path for lomo_optim twice a step; the trainer caches
    its answer (which cannot change in a run), once, in the modules that ask."""
    import accelerate.accelerator
    import accelerate.optimizer

    from scaling_abs.trainer import cache_lomo_check

    cache_lomo_check()
    cache_lomo_check()
    for module in (accelerate.optimizer, accelerate.accelerator):
        check = module.is_lomo_available
        assert hasattr(check, "cache_info") and not hasattr(check.__wrapped__, "cache_info")
        assert check() == check.__wrapped__()
