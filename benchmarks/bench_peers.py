"""nnsim_hooks against the peer packages themselves, at the same work (issue 12).

Each peer projects the per-sample gradients of the same scalar (the contrast of a fixed
class, ``peers/workload.py``) for the same batch of 64 to about D = 1024 numbers, on
resnet18 and a small timm ViT at 32x32. For each (peer, workload), in its own process
with a timeout (a crash or hang costs one row):

- time per batch over a plain forward + backward of the same batch, the two measured
  alternately in that process (median of the repeats);
- peak memory: the process's peak RSS above its state before the peer was set up
  (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``), or
  ``torch.cuda.max_memory_allocated`` above the allocation before set-up on CUDA;
- error ratio: mean |projected cosine - exact cosine| over all pairs of the batch,
  averaged over the peer's seeds, over the same for an ideal dense Gaussian projection
  of the exact gradients to D (exact from a per-sample loop in float64; ``peers/metrics.py``).

The peers are never dependencies of nnsim_hooks: the script makes its own virtual
environment (``benchmarks/.peers-venv``, git-ignored) with them from PyPI and re-runs
itself there, with this repository on ``PYTHONPATH``.

    python benchmarks/bench_peers.py [--device cuda] [--out benchmarks/results/peers_cpu.md]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".peers-venv"
# torch / torchvision as the project's Makefile pins them (on this machine's disk).
# logix-ai declares Python < 3.11 but is pure Python and runs on 3.11: installed apart,
# with --ignore-requires-python.
REQUIREMENTS = [
    "torch==2.14.1", "torchvision==0.29.1", "timm", "numpy", "tqdm", "faiss-cpu",
    "traker==0.3.2", "bergson==2.5.1", "dattri==0.3.0", "captum==0.9.0", "opacus==1.6.0",
]
LOOSE_REQUIREMENTS = ["logix-ai==0.1.1"]
PEER_TIMEOUT_S = 600


def in_peers_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv() -> Path:
    """Create / update the peers' virtual environment; returns its python."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed.json"
    wanted = json.dumps({"requirements": REQUIREMENTS, "loose": LOOSE_REQUIREMENTS})
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    print(f"installing the peers into {VENV} (once; a few minutes)", flush=True)
    subprocess.run(pip + REQUIREMENTS, check=True)
    subprocess.run(pip + ["--ignore-requires-python"] + LOOSE_REQUIREMENTS, check=True)
    marker.write_text(wanted)
    return python


def reexec_in_venv() -> None:
    python = ensure_venv()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


# ---------------------------------------------------------------------------- child side


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    text = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def _timed(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peer_version(adapter_cls) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(adapter_cls.package)
    except PackageNotFoundError:
        return "(from this checkout)" if adapter_cls.package == "nnsim_hooks" else "not installed"


def run_child(peer: str, workload_name: str, args) -> dict:
    """One (peer, workload): timing against the plain step, peak memory, features per seed."""
    adapter_cls = importlib.import_module(f"peers.{peer}").Peer
    result = {"version": peer_version(adapter_cls)}
    try:
        return _measure(adapter_cls, peer, workload_name, args, result)
    except Exception as exc:  # noqa: BLE001 - one line for the table, whatever the peer raised
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {**result, "error": f"{type(exc).__name__}: {message}"[:200]}


def _measure(adapter_cls, peer: str, workload_name: str, args, result: dict) -> dict:
    import torch

    from peers import workload
    from peers.base import Unsupported

    work = Path(args.workdir)
    state = torch.load(work / f"{workload_name}_state.pt")
    x, y = (t.to(args.device) for t in torch.load(work / f"{workload_name}_batch.pt"))
    repeats = 1 if adapter_cls.slow else args.repeats
    seeds = args.slow_seeds if adapter_cls.slow else args.seeds

    plain_model = workload.build_model(workload_name, state).to(args.device)
    workload.plain_step(plain_model, x, y)  # warm-up
    fresh = lambda: workload.build_model(workload_name, state).to(args.device)  # noqa: E731

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
        result["memory"] = "peak RSS" if _reset_peak() else "peak RSS (not reset: includes set-up)"
    try:
        adapter = adapter_cls(fresh(), workload_name, args.dim, 0, args.device, (x, y))
        first_s = _timed(lambda: setattr(adapter, "_out", adapter(x, y)), args.device)
    except Unsupported as exc:
        return {**result, "error": str(exc)}
    if cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        result["peak_mb"] = _peak_rss_mb() - base
    features = [adapter._out.detach().float().cpu()]

    plain_s, peer_s = [], []
    if adapter_cls.slow:
        plain_s.append(_timed(lambda: workload.plain_step(plain_model, x, y), args.device))
        peer_s.append(first_s)  # a slow peer's first call is its one timed repeat
    for _ in range(repeats if not adapter_cls.slow else 0):
        plain_s.append(_timed(lambda: workload.plain_step(plain_model, x, y), args.device))
        peer_s.append(_timed(lambda: adapter(x, y), args.device))
    if adapter_cls.slow:
        plain_s.append(_timed(lambda: workload.plain_step(plain_model, x, y), args.device))
    result["notes"] = adapter.notes
    for seed in range(1, seeds):
        again = adapter.reseeded(seed)
        if again is None:
            other = adapter_cls(fresh(), workload_name, args.dim, seed, args.device, (x, y))
            again = other(x, y)
            other.close()
        features.append(again.detach().float().cpu())
    adapter.close()
    torch.save(features, work / f"{peer}_{workload_name}_features.pt")
    result.update(
        plain_s=statistics.median(plain_s), peer_s=statistics.median(peer_s), repeats=len(peer_s),
        seeds=len(features), dim=int(features[0].shape[1]),
    )
    return result


def run_exact(workload_name: str, args) -> dict:
    """The oracle, in its own process: exact cosines and the ideal projection's MAE."""
    import torch

    from peers import metrics, workload

    work = Path(args.workdir)
    model = workload.build_model(workload_name, torch.load(work / f"{workload_name}_state.pt"))
    x, y = torch.load(work / f"{workload_name}_batch.pt")
    cos = metrics.exact_cosines(model, x, y, workload.scalar, progress=True)
    torch.save(cos, work / f"{workload_name}_exact.pt")
    return {"ideal_mae": metrics.ideal_mae(cos, args.dim)}


# --------------------------------------------------------------------------- parent side


def call_child(argv, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return {"error": (tail[-1] if tail else f"exit code {out.returncode}")[:200]}
    return json.loads(lines[-1])


def machine_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    load = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch "
        f"{torch.__version__}, Python {platform.python_version()}; load average at the start "
        f"{load[0]:.1f}"
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--workloads", nargs="+", default=["resnet18", "vit_tiny"])
    parser.add_argument("--peers", nargs="+", default=None, help="default: all (peers/__init__.py)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed repeats (slow peers: 1)")
    parser.add_argument("--seeds", type=int, default=4, help="projection seeds for the error (slow peers: --slow-seeds)")
    parser.add_argument("--slow-seeds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=PEER_TIMEOUT_S, help="seconds per peer and workload")
    parser.add_argument("--out", default=None, help="write the Markdown table here too")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter (peers must be importable)")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("PEER", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--exact", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if not args.no_venv and not in_peers_venv():
        reexec_in_venv()  # does not return
    sys.path.insert(0, str(HERE))
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child or args.exact:
        try:
            result = run_child(*args.child, args) if args.child else run_exact(args.exact, args)
        except Exception as exc:  # noqa: BLE001 - one line for the table, whatever the peer raised
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
        print(json.dumps(result), flush=True)
        return

    from peers import PEERS, metrics, workload

    peers = args.peers or PEERS
    forwarded = ["--device", args.device, "--dim", str(args.dim), "--repeats", str(args.repeats),
                 "--seeds", str(args.seeds), "--slow-seeds", str(args.slow_seeds)]
    if args.no_venv:
        forwarded.append("--no-venv")
    command = shlex.join(["python", "benchmarks/bench_peers.py", *sys.argv[1:]])
    rows = []
    started = time.perf_counter()
    machine = machine_line(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as work:
        for name in args.workloads:
            model = workload.build_model(name)
            torch.save(model.state_dict(), Path(work) / f"{name}_state.pt")
            torch.save(workload.make_batch(args.batch), Path(work) / f"{name}_batch.pt")
            exact = call_child(["--exact", name, "--workdir", work, *forwarded], args.timeout)
            if "error" in exact:
                print(f"{name}: the exact cosines failed: {exact['error']}", file=sys.stderr)
                continue
            cos = torch.load(Path(work) / f"{name}_exact.pt")
            for peer in peers:
                r = call_child(["--child", peer, name, "--workdir", work, *forwarded], args.timeout)
                r.setdefault("version", peer_version(importlib.import_module(f"peers.{peer}").Peer))
                if "error" not in r:
                    feats = torch.load(Path(work) / f"{peer}_{name}_features.pt")
                    mae = sum(metrics.projected_mae(f, cos) for f in feats) / len(feats)
                    r["error_ratio"] = mae / exact["ideal_mae"]
                rows.append((peer, name, r))
                print(json.dumps({"peer": peer, "workload": name, **r}), flush=True)
                if args.out:  # after every row, so that a run cut short still leaves its rows
                    minutes = (time.perf_counter() - started) / 60
                    total = len(peers) * len(args.workloads)
                    Path(args.out).write_text(render(rows, args, command, machine, minutes, total))
    minutes = (time.perf_counter() - started) / 60
    table = render(rows, args, command, machine, minutes)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def render(rows, args, command, machine, minutes, expected=None) -> str:
    progress = f"; still running: {len(rows)} of {expected} rows so far" if expected and len(rows) < expected else ""
    lines = [
        "# nnsim_hooks and the peer packages at the same work",
        "",
        f"Command: `{command}` ({minutes:.0f} minutes{progress})",
        "",
        f"Machine: {machine}. Batch {args.batch}, 32x32 inputs, D = {args.dim}.",
        "",
        "Every peer projects the per-sample gradients of the same scalar per sample (the contrast "
        "`z_y - mean_{c != y} z_c` of a fixed class y per sample) for the same batch and weights. "
        "`x plain step`: median time per batch over a plain forward + backward of the batch, the two "
        f"timed alternately in the peer's own process ({args.repeats} repeats; 1 for the slow peers, "
        "TRAK, dattri and Opacus). `peak MB`: "
        + ("`torch.cuda.max_memory_allocated` above the allocation before the peer's set-up. "
           if args.device.startswith("cuda") else
           "the process's peak RSS above its state before the peer's set-up (set-up and one batch). ")
        + "`error ratio`: mean |projected - exact cosine| over all pairs, averaged over the peer's "
        f"seeds ({args.seeds}; {args.slow_seeds} for the slow peers), over the same for an ideal dense "
        f"Gaussian projection of the exact gradients to D = {args.dim} (exact: per-sample loop in float64, "
        "all trainable parameters). Peers that cover only some parameters or project to another D pay "
        "for it in that ratio (see notes).",
        "",
        "Ratios are measured alternately in one process, so that load on the machine (another job, the "
        "slow peers' own threads) weighs on both sides alike; the slow peers' ratios rest on one timed "
        "repeat each (their plain steps in the notes show how much the baseline moved).",
        "",
        "| peer | version | workload | x plain step | peak MB | error ratio | notes |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    plain = {}  # the slowest plain step of each workload: the most conservative bound for a timed-out peer
    for _, name, r in rows:
        if "plain_s" in r:
            plain[name] = max(plain.get(name, 0.0), r["plain_s"])
    for peer, name, r in rows:
        timeout = re.fullmatch(r"timed out after (\d+) s", r.get("error", ""))
        if timeout and name in plain:
            # Killed inside its first batch: it takes longer than the timeout, a lower bound.
            seconds = float(timeout.group(1))
            lines.append(
                f"| {peer} | {r.get('version', '')} | {name} | > {seconds / plain[name]:.0f} | | | timed out after "
                f"{seconds:.0f} s inside its first batch (bound against the slowest plain step of the other rows, {plain[name]:.3f} s) |"
            )
            continue
        if "error" in r:
            lines.append(f"| {peer} | {r.get('version', '')} | {name} | | | | fails: {_cell(r['error'])} |")
            continue
        lines.append(
            f"| {peer} | {r['version']} | {name} | {r['peer_s'] / r['plain_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['error_ratio']:.2f} | {_cell(r['notes'])} (plain step {r['plain_s']:.3f} s, "
            f"{r['repeats']} repeat(s), {r['seeds']} seed(s)) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
