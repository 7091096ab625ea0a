"""Shared helpers for the benchmarks: models, timing, peak memory in a child process."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torchvision


def resnet18_32() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def small_vit() -> nn.Module:
    # ViT-Tiny-like width, 32x32 inputs, patch 4 (64 tokens + cls), 6 blocks.
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10
    )
    # torchvision zeroes the head (for fine-tuning): every other gradient would be zero.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


MODELS: Dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18_32, "vit_small": small_vit}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(script: str, args: List[str]) -> dict:
    """Run ``script args`` in a fresh interpreter (so peak memory is its own); it prints
    one JSON line last."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_line(device: str) -> str:
    threads = torch.get_num_threads()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        return f"{name}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({threads} torch threads), torch {torch.__version__}"
