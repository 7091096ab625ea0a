"""Coverage of timm: does every model family attach and match the per-sample oracle?

For one representative model per family (family = the timm module that defines the
model, ``timm.list_modules()``; representative = the family's smallest model by
parameter count), this script:

1. creates it with ``pretrained=False`` at the smallest input size that runs (trying
   64, 96, 128, 160, 224 px, passing ``img_size`` to models that take it);
2. attaches (after ``register_timm_rules()`` and ``prepare_timm_model``) and records how many parameters are on
   fast rules and how many on the torch.func fallback;
3. compares ``per_sample_gradients`` on a batch of 2 with a per-sample loop oracle
   (plain autograd, one sample at a time, see :func:`paired_loop`), in float64 so that only real errors
   show: the max relative error is ``max |hooked - loop| / max |loop|`` over all
   parameters (the denominator floored at 1e-6 of the model's largest entry, since a
   parameter whose true gradient is zero holds only rounding noise);
4. runs ``features`` (the sketch path) and compares the sketched cosine of the pair
   with the exact one.

Each model runs in its own subprocess with a time limit. Models above
``--max-params`` are shrunk with ``depth=2`` when their constructor takes it, else
skipped with the reason recorded.

    OMP_NUM_THREADS=2 nice python benchmarks/timm_coverage.py            # every family
    python benchmarks/timm_coverage.py --families resnet,vision_transformer
    python benchmarks/timm_coverage.py --one test_vit                     # one model, JSON

Writes ``benchmarks/results/timm_coverage.md`` (and the raw rows as ``.json``; with
``--update --families a,b`` only those families are rerun and the rest kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "timm_coverage.md")
SIZES = (64, 96, 128, 160, 224)
TOLERANCE = 1e-6  # float64: anything above is a real disagreement


# -- choosing the representatives ------------------------------------------------------


def count_params(name: str) -> Optional[int]:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def representatives(families: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """The smallest model of each family (by parameter count on the meta device)."""
    import timm

    out = []
    for family in timm.list_modules():
        if families and family not in families:
            continue
        best = None
        for name in timm.list_models(module=family):
            n = count_params(name)
            if n is not None and (best is None or n < best[1]):
                best = (name, n)
        if best is None:
            out.append({"family": family, "model": "-", "params": None})
        else:
            out.append({"family": family, "model": best[0], "params": best[1]})
        print(f"  {family}: {out[-1]['model']} ({out[-1]['params']})", file=sys.stderr, flush=True)
    return out


# -- one model (runs in a subprocess) --------------------------------------------------------


def _create(name: str, size: int, extra: Dict[str, Any]):
    import timm

    try:
        return timm.create_model(name, pretrained=False, img_size=size, **extra), True
    except TypeError:
        return timm.create_model(name, pretrained=False, **extra), False


def _runs_at(model, channels: int, size: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(torch.randn(1, channels, size, size))
        return True
    except Exception:
        return False


def paired_loop(model, x, names):
    """The per-sample loop oracle, each sample run as a batch of two copies of itself
    (the gradient of the first copy's output). ``oracle.per_sample_loop`` runs batches
    of one, where PyTorch 2.x's CPU BatchNorm backward gives wrong weight gradients for
    some gradient layouts (strides (C, 1, W*C, C) with B = 1: see the integrations
    report), which would show as false mismatches (iformer, efficientformer)."""
    import torch

    from nnsim_hooks.engine.outputs import make_output_spec

    spec = make_output_spec("auto")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n in names]
    rows: Dict[str, list] = {n: [] for n, _ in params}
    for b in range(x.shape[0]):
        pair = torch.cat([x[b: b + 1], x[b: b + 1]])
        with torch.enable_grad():
            out = model(pair)
            spec = spec.resolve(out)
            value = spec(out, None, 2)[0]
            grads = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def run_one(name: str, max_params: float) -> Dict[str, Any]:
    import timm
    import torch

    from nnsim_hooks import attach
    from nnsim_hooks.integrations.timm import prepare_timm_model
    from nnsim_hooks.integrations.timm_rules import register_timm_rules

    register_timm_rules()
    torch.manual_seed(0)
    result: Dict[str, Any] = {"model": name}
    extra: Dict[str, Any] = {}
    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    if params > max_params:
        try:
            with torch.device("meta"):
                small = sum(p.numel() for p in timm.create_model(name, pretrained=False, depth=2).parameters())
            extra = {"depth": 2}
            result["note"] = f"depth=2 ({params / 1e6:.0f}M at full depth)"
            params = small
        except Exception:
            pass
    if params > max_params:
        result.update(status="skipped", error=f"{params / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M")
        return result
    default = timm.create_model(name, pretrained=False, **extra)
    channels, *default_size = timm.data.resolve_model_data_config(default)["input_size"]
    model, size = None, None
    for candidate in SIZES + (default_size[0],):
        m, sized = _create(name, candidate, extra)
        m.eval()
        if _runs_at(m, channels, candidate):
            model, size = m, candidate
            break
        if not sized and candidate != default_size[0]:
            continue
    if model is None:
        result.update(status="error", error=f"does not run at any of {SIZES + (default_size[0],)} px")
        return result
    model = prepare_timm_model(model.double())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update(params=trainable, input=f"{channels}x{size}x{size}")
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    t0 = time.perf_counter()
    with attach(model, sketch_dim=1024) as handle:
        rows = handle.coverage.rows
        fast = sum(r.parameters for r in rows if r.status == "fast")
        fallback = sum(r.parameters for r in rows if r.status == "fallback")
        result["fast_pct"] = 100.0 * fast / max(1, fast + fallback)
        result["fallback_types"] = sorted({r.type for r in rows if r.status == "fallback"})
        hooked = handle.per_sample_gradients(x)
        t_hooked = time.perf_counter() - t0
        features = handle.features(x)
        exact = handle.similarity(x)
    t1 = time.perf_counter()
    reference = paired_loop(model, x, set(hooked))
    t_loop = time.perf_counter() - t1
    missing = sorted(set(reference) - set(hooked))
    misshaped = sorted(k for k in hooked if k in reference and hooked[k].shape != reference[k].shape)
    if misshaped:
        k = misshaped[0]
        result.update(status="MISMATCH", time_hooked_s=t_hooked, time_loop_s=t_loop,
                      error=f"{len(misshaped)} parameters with per-row gradients, e.g. {k}: "
                            f"{tuple(hooked[k].shape[:1])} rows for a batch of 2")
        return result
    worst, worst_name = 0.0, ""
    # Relative to the parameter's own largest gradient, but not below 1e-6 of the model's:
    # a parameter whose true gradient is zero (a softmax over one key) has noise-sized
    # entries that differ relatively by O(1).
    floor = 1e-6 * max((r.abs().max().item() for r in reference.values()), default=1.0)
    for pname, ref in reference.items():
        if pname not in hooked:
            continue
        scale = max(ref.abs().max().item(), floor)
        err = (hooked[pname] - ref).abs().max().item() / (scale if scale > 0 else 1.0)
        if err > worst:
            worst, worst_name = err, pname
    sketch_cos = float((features[0] @ features[1]).item())
    exact_cos = float(exact[0, 1].item())
    result.update(
        max_rel_err=worst,
        worst_param=worst_name,
        time_hooked_s=t_hooked,
        time_loop_s=t_loop,
        sketch_abs_err=abs(sketch_cos - exact_cos),
        status="ok" if not missing and worst <= TOLERANCE else "MISMATCH",
    )
    if missing:
        result["error"] = f"{len(missing)} parameters without hooked gradients: {missing[:3]}"
    elif worst > TOLERANCE:
        result["error"] = f"relative error {worst:.1e} at {worst_name}"
    return result


# -- the table ------------------------------------------------------------------------------


def run_isolated(name: str, timeout: float, max_params: float) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--max-params", str(max_params)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    elapsed = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode < 0:
        return {"model": name, "status": "error", "time_total_s": elapsed,
                "error": f"killed by signal {-proc.returncode} (out of memory?)"}
    if proc.returncode != 0 or not lines:
        errors = [x for x in proc.stderr.strip().splitlines() if "Error" in x] or proc.stderr.strip().splitlines()
        tail = (errors or ["(no output)"])[-1]
        return {"model": name, "status": "error", "error": tail[:300], "time_total_s": elapsed}
    result = json.loads(lines[-1])
    result["time_total_s"] = elapsed
    return result


# Failure patterns with a known cause (messages of nnsim_hooks' own errors).
KNOWN_CAUSES = (
    ("mixes the samples", "the model couples the samples of a batch: per-sample gradients are not defined"),
    ("BatchCouplingError", "the model couples the samples of a batch: per-sample gradients are not defined"),
)


# Failures diagnosed by hand.
KNOWN_MODELS = {
    "csatv2": "timm bug: SpatialTransformerBlock attends across the batch (q @ k.T is [B, B]) after a "
              "LayerNorm over 1 feature, whose output is the same for every sample: the forward values do not "
              "show it, the gradients do; nnsim_hooks warns (RuntimeWarning from its gradient layout check)",
}


def diagnose(result: Dict[str, Any]) -> Optional[str]:
    if result.get("status") != "ok" and result.get("model") in KNOWN_MODELS:
        return KNOWN_MODELS[result["model"]]
    error = result.get("error") or ""
    for pattern, cause in KNOWN_CAUSES:
        if pattern in error:
            return cause
    return None


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def write_table(rows: List[Dict[str, Any]], path: str, command: str, elapsed: float) -> None:
    import timm
    import torch

    ok = sum(r.get("status") == "ok" for r in rows)
    lines = [
        "# timm coverage",
        "",
        "One representative model per timm family (the module that defines it; the smallest model of the",
        "family), created with `pretrained=False`, attached with `nnsim_hooks.attach` after",
        "`register_timm_rules()`, and compared with the per-sample loop oracle on a batch of 2 in float64",
        "(`max rel err` = max over parameters of max |hooked - loop| / max |loop|, the denominator floored at",
        "1e-6 of the model's largest gradient entry; ok means <= 1e-6 and every parameter has a gradient). `fast %` = share of trainable parameters on fast rules (the rest use",
        "the torch.func fallback). `sketch err` = |sketched cosine - exact cosine| of the pair at D=1024.",
        "Times are seconds on this machine for the hooked per-sample gradients and for the loop.",
        "",
        f"Command: `{command}`",
        "",
        f"timm {timm.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; total {elapsed / 60:.0f} min.",
        "",
        f"**{ok} of {len(rows)} families ok.**",
        "",
        "| family | model | input | params | fast % | max rel err | hooked s | loop s | sketch err | status | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        notes = "; ".join(x for x in (diagnose(r), r.get("note"), r.get("error")) if x)
        if r.get("fallback_types"):
            notes = (notes + "; " if notes else "") + "fallback: " + ", ".join(r["fallback_types"][:4])
        params = r.get("params")
        lines.append(
            f"| {r.get('family', '-')} | {r.get('model', '-')} | {r.get('input', '-')} | "
            f"{_fmt(params / 1e6 if params else None, '.2f')}M | {_fmt(r.get('fast_pct'), '.1f')} | "
            f"{_fmt(r.get('max_rel_err'), '.1e')} | {_fmt(r.get('time_hooked_s'), '.2f')} | "
            f"{_fmt(r.get('time_loop_s'), '.2f')} | {_fmt(r.get('sketch_abs_err'), '.3f')} | "
            f"{r.get('status')} | {notes.replace('|', '/')} |"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated timm modules (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=60e6, help="shrink or skip models above this")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--update", action="store_true",
                        help="keep the other families' rows from the previous run's JSON, rerun only these")
    parser.add_argument("--representatives", help="a JSON file caching the chosen models (read if present, "
                        "else written)")
    parser.add_argument("--one", help="run one model and print its JSON result (used internally)")
    args = parser.parse_args(argv)
    if args.one:
        try:
            result = run_one(args.one, args.max_params)
        except Exception as exc:  # recorded in the table, not raised
            result = {"model": args.one, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(result))
        return 0
    start = time.perf_counter()
    families = args.families.split(",") if args.families else None
    if args.representatives and os.path.isfile(args.representatives):
        with open(args.representatives) as f:
            reps = [r for r in json.load(f) if not families or r["family"] in families]
    else:
        print("choosing representatives...", file=sys.stderr, flush=True)
        reps = representatives(families)
        if args.representatives:
            with open(args.representatives, "w") as f:
                json.dump(reps, f, indent=1)
    rows = []
    command = "python benchmarks/timm_coverage.py" + (f" --families {args.families}" if args.families else "")
    raw_path = os.path.splitext(args.out)[0] + ".json"
    previous: Dict[str, Dict[str, Any]] = {}
    if args.update and os.path.isfile(raw_path):
        with open(raw_path) as f:
            previous = {r["family"]: r for r in json.load(f)}
        command = "python benchmarks/timm_coverage.py (with --update reruns of some families)"

    def save():
        merged = dict(previous)
        merged.update({r["family"]: r for r in rows})
        ordered = [merged[k] for k in sorted(merged)]
        write_table(ordered, args.out, command, time.perf_counter() - start)
        tmp = raw_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ordered, f, indent=1)
        os.replace(tmp, raw_path)

    for rep in reps:
        if rep["model"] == "-":
            rows.append(dict(rep, status="error", error="no model of this family can be created"))
            continue
        result = run_isolated(rep["model"], args.timeout, args.max_params)
        result["family"] = rep["family"]
        rows.append(result)
        print(f"{rep['family']:28s} {rep['model']:36s} {result.get('status'):9s} "
              f"{_fmt(result.get('max_rel_err'), '.1e')} {result.get('error', '')}", file=sys.stderr, flush=True)
        save()  # progress survives a kill
    save()
    print(f"wrote {args.out} and {raw_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
