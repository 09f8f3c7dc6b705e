"""Run under torchrun: trains from a JSON config and saves each rank's weights and, at each check,
the sums of its floating-point buffers."""

import json
import os
import sys

import torch

from scaling_abs.config import load_config
from scaling_abs.trainer import Trainer

torch.set_num_threads(1)
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
trainer = Trainer(load_config(None, overrides))
check_buffers = []  # each check's floating-point buffers (BatchNorm statistics), as this rank has them
check = trainer._check


def recording_check(*args, **kwargs):
    check_buffers.append(
        [b.double().sum().item() for b in trainer.raw_model.buffers() if b.is_floating_point()]
    )
    return check(*args, **kwargs)


trainer._check = recording_check
try:
    trainer.fit()
    # the module the trainer keeps is the one under DDP's or DeepSpeed's wrapper
    assert trainer.raw_model is trainer.accelerator.unwrap_model(trainer.model)
    rank = int(os.environ.get("RANK", "0"))
    weights = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    torch.save(weights, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}_check_buffers.json"), "w") as f:
        json.dump(check_buffers, f)
finally:
    trainer.close()
