"""Run under torchrun: trains from a JSON config and saves each rank's weights and eigenvalues."""

import json
import os
import sys

import torch

from scaling_abs.config import load_config
from scaling_abs.trainer import Trainer

torch.set_num_threads(1)
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
trainer = Trainer(load_config(None, overrides))
try:
    trainer.fit()
    # the module the trainer keeps is the one under DDP's or DeepSpeed's wrapper
    assert trainer.raw_model is trainer.accelerator.unwrap_model(trainer.model)
    rank = int(os.environ.get("RANK", "0"))
    weights = {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}
    torch.save(weights, os.path.join(out, f"rank{rank}.pt"))
finally:
    trainer.close()
