"""Features throughput on a GPU against the plain training step (issue 18, item 5).

For a timm ResNet-50 and a ViT-B/16 at 224x224 and a realistic batch, the samples per
second of

- ``plain step``: forward, cross-entropy, backward and an SGD step (what training costs);
- ``features (D=1024)``: ``handle.features(x)``, the sketched per-sample gradients that
  go into an index (forward, one backward, the sketch);

in float32 (TF32 as torch's defaults allow) and under bfloat16 autocast, and their ratio
(goal: features at 40% of the plain step's throughput or more). Then a parity check on
the GPU: features, the exact similarity and the exact density of a small model on CUDA
against the same on the CPU (the sketch is drawn on the CPU, so the numbers must agree
to float32 rounding).

    python benchmarks/bench_gpu_features.py [--device cuda] [--out benchmarks/results/features_gpu.md]
    python benchmarks/bench_gpu_features.py --device cpu --tiny   # a dry run of the code paths
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nnsim_hooks  # noqa: E402

GOAL = 0.40
# name -> (timm model, input side, batch)
MODELS = {"resnet50": ("resnet50", 224, 128), "vit_base_patch16_224": ("vit_base_patch16_224", 224, 64)}
TINY = {"resnet": ("test_resnet", 32, 4), "vit": ("test_vit", 32, 4)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, budget_s: float, min_runs: int = 3) -> float:
    """Median seconds of ``fn`` after two warm-up runs, over at least ``min_runs`` runs
    and up to ``budget_s`` seconds."""
    for _ in range(2):
        fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure(model_name: str, side: int, batch: int, device: torch.device, amp: bool, budget_s: float) -> Dict:
    import timm

    torch.manual_seed(0)
    sized = {"img_size": side} if "vit" in model_name else {}
    model = timm.create_model(model_name, pretrained=False, num_classes=1000, **sized).to(device)
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else _no_autocast

    def plain():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain_s = timed(plain, device, budget_s)
    plain_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    row = {"model": model_name, "batch": batch, "precision": "bf16 autocast" if amp else "float32",
           "plain_sps": batch / plain_s, "plain_gib": plain_mem}
    try:
        with nnsim_hooks.attach(model, sketch_dim=1024, batch_size=batch) as h:
            def features():
                with autocast():
                    h.features(x)

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            feat_s = timed(features, device, budget_s)
            row["features_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            row["features_sps"] = batch / feat_s
            row["ratio"] = row["features_sps"] / row["plain_sps"]
    except torch.cuda.OutOfMemoryError as exc:  # say so in the table; the other rows still run
        row["error"] = f"out of GPU memory at batch {batch}: {str(exc).splitlines()[0][:80]}"
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(row, flush=True)
    return row


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parity(device: torch.device, n: int = 16) -> List[Dict]:
    """A small model on ``device`` against the same on the CPU: features (same sketch seed),
    the exact similarity, the exact density."""
    import timm

    torch.manual_seed(0)
    cpu_model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    x = torch.randn(n, 3, 32, 32)
    out = []
    results = {}
    data = torch.utils.data.TensorDataset(x, torch.arange(n) % 10)
    for where, model in (("cpu", cpu_model), (str(device), copy.deepcopy(cpu_model).to(device))):
        with nnsim_hooks.attach(model, sketch_dim=256, seed=5) as h:
            results[where] = {
                "features": h.features(x.to(device if where != "cpu" else "cpu")).float().cpu(),
                "similarity": h.similarity(x.to(device if where != "cpu" else "cpu")).double().cpu(),
                "density": torch.as_tensor(h.density(data, progress=False, batch_size=8)),
            }
    for name in ("features", "similarity", "density"):
        a, b = results["cpu"][name].double(), results[str(device)][name].double()
        scale = float(a.abs().max())
        err = float((a - b).abs().max()) / max(scale, 1e-12)
        # TF32 convolutions on CUDA round to about 1e-3; more than 1e-2 is a bug, not rounding
        out.append({"quantity": name, "max_rel_diff": err, "ok": err < 1e-2})
        print(out[-1], flush=True)
    return out


def table(rows: List[Dict], checks: List[Dict], device: torch.device, tiny: bool, parity_n: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        "# Features throughput on a GPU against the plain training step",
        "",
        f"Device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
        f"TF32 cudnn {torch.backends.cudnn.allow_tf32}. Command: `python benchmarks/bench_gpu_features.py"
        f"{' --tiny' if tiny else ''} --device {device}`" + (" (a dry run at tiny sizes, not a measurement)" if tiny or device.type != "cuda" else "") + ".",
        "",
        "Plain step: forward, cross-entropy, backward, SGD step (train mode). Features: `handle.features(x)` with "
        "`sketch_dim=1024` (eval mode: one forward, one backward, the sketch). Samples per second, medians; "
        f"goal: features at >= {GOAL:.0%} of the plain step.",
        "",
        "| model | batch | precision | plain step (samples/s) | features (samples/s) | ratio | goal | GPU memory plain / features (GiB) |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['plain_sps']:.4g} | {r['error']} | – | – | – |")
            continue
        ok = "met" if r["ratio"] >= GOAL else "**not met**"
        lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['plain_sps']:.4g} | {r['features_sps']:.4g} | "
                     f"{r['ratio']:.2f} | {ok} | {r['plain_gib']:.1f} / {r['features_gib']:.1f} |")
    lines += ["", f"Parity, a timm test_resnet on the GPU against the CPU ({parity_n} samples; features with the same "
              "sketch seed):", "",
              "| quantity | max relative difference | within 1e-2 |", "|---|---:|---|"]
    for c in checks:
        lines.append(f"| {c['quantity']} | {c['max_rel_diff']:.1e} | {'yes' if c['ok'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (a dry run of the code)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed runs per measurement")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_gpu_features: --device cuda but torch sees no GPU", file=sys.stderr)
            return 1
        torch.backends.cudnn.benchmark = True
    models = TINY if args.tiny else MODELS
    rows = []
    for timm_name, side, batch in models.values():
        for amp in (False, True):
            rows.append(measure(timm_name, side, batch, device, amp, args.budget))
    parity_n = 16 if device.type == "cuda" else 4  # on the CPU: the code against itself
    checks = parity(device, parity_n)
    text = table(rows, checks, device, args.tiny, parity_n)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    failed = [c["quantity"] for c in checks if not c["ok"]]
    if failed:
        print(f"bench_gpu_features: the GPU disagrees with the CPU on {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
