"""LogIX (``logix-ai``), LoGra: random LoRA-style encoders on every Linear / Conv2d
(``add_lora`` with ``init="random"``), the per-sample gradient of each rank x rank
bottleneck logged by hooks. LoGra's budget is per module (rank^2 numbers each); the
rank is chosen so that the total is about D. Norms, biases and bare parameters
(cls token, position embedding) are not covered."""

from __future__ import annotations

import math
import os
import tempfile

import torch.nn as nn

from .base import Adapter
from .workload import scalar

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Peer(Adapter):
    package = "logix-ai"

    def __init__(self, model, workload, dim, seed, device, sample):
        super().__init__(model, workload, dim, seed, device, sample)
        import torch
        from logix import LogIX
        from logix.config import LoRAConfig

        torch.manual_seed(seed)  # LoGra draws its random encoders from torch's global generator
        modules = sum(isinstance(m, SUPPORTED) for m in model.modules())
        rank = max(1, round(math.sqrt(dim / modules)))
        self._dir = tempfile.TemporaryDirectory()
        cwd = os.getcwd()
        os.chdir(self._dir.name)  # LogIX writes its config and LoRA state under the working directory
        try:
            self.run = LogIX(project="bench")
            self.run.watch(model)
            self.run.add_lora(lora_config=LoRAConfig(init="random", rank=rank))
            self.run.setup({"grad": ["log"]})
        finally:
            os.chdir(cwd)
        self.rank = rank
        self.modules = modules
        self.notes = f"LoRA rank {rank} on {modules} Linear/Conv modules"

    def __call__(self, x, y):
        import torch

        with self.run(data_id=list(range(x.shape[0]))):
            self.model.zero_grad(set_to_none=True)
            scalar(self.model(x), y).sum().backward()
        _, log = self.run.get_log()
        feats = torch.cat([log[name]["grad"].reshape(x.shape[0], -1) for name in sorted(log)], 1)
        if "D =" not in self.notes:
            self.notes += f", D = {feats.shape[1]}"
        return feats

    def close(self):
        self._dir.cleanup()
