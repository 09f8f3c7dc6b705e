"""Launcher configs parse and say what they claim; DeepSpeed "auto" values are filled by the trainer."""

import json
from pathlib import Path

import pytest
import yaml

from scaling_abs.batching import make_plan
from scaling_abs.config import load_config
from scaling_abs.trainer import _deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path):
    cfg = yaml.safe_load(path.read_text())
    for key in ("compute_environment", "distributed_type", "num_machines", "num_processes", "machine_rank"):
        assert key in cfg, key
    assert path.read_text().lstrip().startswith("#")  # commented like Accelerate's own templates
    if cfg["distributed_type"] == "DEEPSPEED":
        assert (ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).exists()


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill_auto(path):
    raw = json.loads(path.read_text())
    assert raw["train_batch_size"] == "auto" and raw["gradient_clipping"] == "auto"
    cfg = load_config(None, {"deepspeed": str(path), "grad_clip": 0.0, "mixed_precision": "bf16"})
    filled = _deepspeed_config(cfg, make_plan(512, 64, 2))
    assert (
        filled["train_batch_size"],
        filled["train_micro_batch_size_per_gpu"],
        filled["gradient_accumulation_steps"],
    ) == (512, 64, 4)
    assert filled["gradient_clipping"] == 0.0  # explicit, never DeepSpeed's/Accelerate's default
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)


def test_fp32_checks_under_deepspeed_low_precision_are_refused(tmp_path):
    """DeepSpeed casts the model itself to bf16/fp16, so hessian_precision=no cannot give fp32
    checks: refused with one line, whether the JSON's precision is "auto" or set explicitly."""
    from scaling_abs.errors import UserError

    zero2 = ROOT / "ds_configs" / "zero2.json"
    explicit = tmp_path / "bf16_on.json"
    explicit.write_text(json.dumps({**json.loads(zero2.read_text()), "bf16": {"enabled": True}}))
    plan = make_plan(512, 64, 2)
    for path, mixed in ((zero2, "bf16"), (zero2, "fp16"), (explicit, "no")):
        cfg = load_config(None, {"deepspeed": str(path), "mixed_precision": mixed, "hessian_precision": "no"})
        with pytest.raises(UserError, match=r"^hessian_precision: no .*DeepSpeed"):
            _deepspeed_config(cfg, plan)
    for path, mixed, checks in ((zero2, "no", "no"), (zero2, "bf16", "auto"), (explicit, "no", "bf16")):
        cfg = load_config(
            None, {"deepspeed": str(path), "mixed_precision": mixed, "hessian_precision": checks}
        )
        _deepspeed_config(cfg, plan)  # accepted
