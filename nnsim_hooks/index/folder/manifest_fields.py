"""Every field of an index (or shard) manifest, typed and bounded.

A manifest is data read from disk: it may have been edited, cut short, crafted, or written
by another program. :func:`parse_manifest` and :func:`check_manifest` make reading it
total: whatever the file holds, the result is a manifest whose every field the store reads
has the type and range the store writes, or a :class:`~nnsim_hooks.errors.StoreError`
naming the file and the field. Nothing downstream then meets a ``KeyError``, a
``TypeError`` or a shape of ``2**70``.

Bounds (far above anything a real index reaches, far below what breaks numpy or FAISS):
the file's size, the JSON's nesting depth, row counts, row shapes and bytes per row, the
number of shards, string lengths. Keys the store does not read are allowed (a newer
version may add some) but count towards the size and depth bounds.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Optional

from ...errors import StoreError
from ..backend import INDEX_KINDS, OPTIONS_BY_KIND
from .schema import COLUMNS, REQUIRED, column_file

#: a manifest file larger than this is not one the store wrote
MAX_MANIFEST_BYTES = 16 << 20
#: nesting depth of the JSON (the store writes 4 levels; a fingerprint adds a few)
MAX_DEPTH = 32
#: rows of an index, samples of a dataset
MAX_ROWS = 1 << 48
#: one entry of a row shape (FAISS dimensions are C ints)
MAX_DIM = (1 << 31) - 1
#: bytes of one row of one column
MAX_ROW_BYTES = 1 << 32
#: shards of one build
MAX_SHARDS = 1 << 20
#: index options (nlist, nprobe, M, ...)
MAX_OPTION = (1 << 31) - 1
MAX_TEXT = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_manifest(text: str, path: Any) -> Any:
    """``json.loads`` of a manifest's text, refusing an oversized or too deeply nested file."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise StoreError(f"the manifest '{path}' is {len(text):,} characters long; the store writes far less than "
                         f"{MAX_MANIFEST_BYTES:,}. The folder is corrupt: rebuild the index")
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise _too_deep(path) from exc
    except ValueError as exc:  # JSONDecodeError, and int() of a number of more than 4300 digits
        raise StoreError(f"the manifest '{path}' is not valid JSON ({exc}); the folder is corrupt") from exc
    if _depth(value) > MAX_DEPTH:
        raise _too_deep(path)
    return value


def _too_deep(path: Any) -> StoreError:
    return StoreError(f"the manifest '{path}' nests deeper than {MAX_DEPTH} levels; the store writes a few. The "
                      "folder is corrupt or crafted: rebuild the index")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: Dict[str, Any], path: Any) -> None:
    """Refuse a manifest whose fields are not exactly what the store writes (see the module
    docstring and :mod:`.schema`)."""

    def bad(what: str) -> StoreError:
        return StoreError(
            f"the manifest '{path}' is corrupt or was edited: {what}. Rebuild the index (build_index(..., "
            "overwrite=True) or GradientIndex.save)"
        )

    check = _Checker(bad)
    count = manifest["count"]
    check.integer(count, "count", 0, MAX_ROWS, "a non-negative integer")
    for key in ("complete", "extraction_complete"):
        if not isinstance(manifest.get(key, False), bool):
            raise bad(f'"{key}" must be true or false, got {check.short(manifest[key])}')
    dim = manifest.get("feature_dim")
    if dim is not None:
        check.integer(dim, "feature_dim", 1, MAX_DIM, "a positive integer")
    _check_columns(manifest, dim, check)
    for key in ("created", "updated", "task"):
        check.optional_text(manifest.get(key), key, 64)
    for key in ("fingerprint", "sketch", "index", "index_file", "dataset", "shard", "shards", "checksums", "versions"):
        check.optional_object(manifest.get(key), key)
    if "source" in manifest and not isinstance(manifest["source"], dict):
        raise bad(f'"source" must be an object, got {check.short(manifest["source"])}')
    fingerprint = manifest.get("fingerprint") or {}
    check.optional_object(fingerprint.get("sketch"), "fingerprint.sketch")
    check.optional_text(fingerprint.get("output"), "fingerprint.output", MAX_TEXT)
    _check_source(manifest.get("source") or {}, check)
    for name, value in (manifest.get("versions") or {}).items():
        check.optional_text(value, f"versions.{name}", 256)
    _check_index(manifest.get("index"), check)
    _check_index_file(manifest.get("index_file"), check)
    _check_dataset(manifest.get("dataset"), check)
    _check_shard(manifest.get("shard"), check)
    _check_shards(manifest.get("shards"), check)
    _check_checksums(manifest.get("checksums"), check)
    listed = manifest.get("nonfinite_rows")
    if listed is not None and (not isinstance(listed, list) or len(listed) > MAX_ROWS
                               or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < count
                                          for r in listed)):
        raise bad(f'"nonfinite_rows" must be a list of row numbers below "count" = {count}, got {check.short(listed)}')
    if manifest.get("nonfinite_count") is not None:
        check.integer(manifest["nonfinite_count"], "nonfinite_count", 0, MAX_ROWS, "a non-negative integer")


def _check_checksums(record: Any, check: "_Checker") -> None:
    """The block checksums of the column files (:mod:`.integrity`): typed, so that a reader
    can trust what it compares against."""
    if record is None:
        return
    check.optional_text(record.get("algorithm"), "checksums.algorithm", 16)
    if record.get("block_bytes") is not None:
        check.integer(record["block_bytes"], "checksums.block_bytes", 1, 2 ** 40, "a positive integer")
    files = record.get("files")
    check.optional_object(files, "checksums.files")
    for name, entry in (files or {}).items():
        check.optional_object(entry, f"checksums.files.{check.short(name)}")
        if entry is None:
            continue
        check.integer(entry.get("bytes"), f"checksums.files.{name}.bytes", 0, 2 ** 50, "a non-negative integer")
        crcs = entry.get("crc32")
        if not isinstance(crcs, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2 ** 32
                                                 for c in crcs):
            raise check.bad(f'"checksums.files.{check.short(name)}.crc32" must be a list of 32-bit integers')


class _Checker:
    """The typed checks, each raising ``bad(what)`` with the field's dotted name."""

    def __init__(self, bad: Callable[[str], StoreError]):
        self.bad = bad

    @staticmethod
    def short(value: Any, limit: int = 60) -> str:
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def integer(self, value: Any, field: str, lo: int, hi: int, what: str) -> int:
        if not is_int(value) or not lo <= value <= hi:
            raise self.bad(f'"{field}" must be {what}, got {self.short(value)} (at most {hi:,} is allowed)')
        return value

    def optional_text(self, value: Any, field: str, limit: int) -> None:
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise self.bad(f'"{field}" must be a string of at most {limit} characters or null, got {self.short(value)}')

    def optional_object(self, value: Any, field: str) -> None:
        if value is not None and not isinstance(value, dict):
            raise self.bad(f'"{field}" must be an object or null, got {self.short(value)}')

    def sha256(self, value: Any, field: str, optional: bool = False) -> None:
        if optional and value is None:
            return
        if not isinstance(value, str) or not _SHA256.match(value):
            raise self.bad(f'"{field}" must be a SHA-256 (64 hex digits), got {self.short(value)}')

    def keys(self, record: Dict[str, Any], field: str, required) -> None:
        missing = [k for k in required if k not in record]
        if missing:
            raise self.bad(f'"{field}" lacks {missing}')


def _check_columns(manifest: Dict[str, Any], dim: Optional[int], check: _Checker) -> None:
    columns = manifest["columns"]
    if not isinstance(columns, dict):
        raise check.bad(f'"columns" must be an object {{name: {{dtype, shape}}}}, got a {type(columns).__name__}')
    for name, spec in columns.items():
        if name not in COLUMNS:
            raise check.bad(f"unknown column {check.short(name)} (the store writes only {sorted(COLUMNS)})")
        dtype, ndim = COLUMNS[name]
        if not isinstance(spec, dict):
            raise check.bad(f"column '{name}' must be an object, got {check.short(spec)}")
        if spec.get("file", column_file(name)) != column_file(name):
            raise check.bad(f"column '{name}' names the file {check.short(spec['file'])}; the store's file for it is "
                      f"'{column_file(name)}' inside the folder, and no other is read or deleted")
        if spec.get("dtype") != dtype:
            raise check.bad(f"column '{name}' has dtype {check.short(spec.get('dtype'))}; the store writes it as {dtype}")
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) != ndim or not all(is_int(s) and 1 <= s <= MAX_DIM for s in shape):
            want = "[]" if ndim == 0 else f"[n] with 1 <= n <= {MAX_DIM:,}"
            raise check.bad(f"column '{name}' has row shape {check.short(shape)}; the store writes {want}")
        if name == "features" and dim is not None and shape != [dim]:
            raise check.bad(f"the features have rows of shape {shape} but \"feature_dim\" is {dim}")
        row_bytes = {"float32": 4, "int64": 8, "bool": 1}[dtype] * (shape[0] if shape else 1)
        if row_bytes > MAX_ROW_BYTES:
            raise check.bad(f"column '{name}' has rows of {row_bytes:,} bytes (at most {MAX_ROW_BYTES:,})")
    empty_share = manifest["count"] == 0 and isinstance(manifest.get("shard"), dict)  # a rank with nothing to do
    if manifest["complete"] and not empty_share:
        missing = [name for name in REQUIRED if name not in columns]
        if missing:
            raise check.bad(f"a complete index needs the columns {list(REQUIRED)}; {missing} are missing")
        if dim is None:
            raise check.bad('a complete index needs "feature_dim"')


def _check_source(source: Dict[str, Any], check: _Checker) -> None:
    if not isinstance(source.get("use_targets", True), bool):
        raise check.bad(f'"source.use_targets" must be true or false, got {check.short(source["use_targets"])}')
    check.optional_text(source.get("data"), "source.data", MAX_TEXT)
    if source.get("batch_size") is not None:
        check.integer(source["batch_size"], "source.batch_size", 1, MAX_ROWS, "a positive integer")


def _check_index(index: Optional[Dict[str, Any]], check: _Checker) -> None:
    if index is None:
        return
    kind = index.get("kind")
    kinds = INDEX_KINDS + ("factory",)
    if kind not in kinds:
        raise check.bad(f'"index.kind" must be one of {list(kinds)}, got {check.short(kind)}')
    factory = index.get("factory", "Flat" if kind == "flat" else None)
    if not isinstance(factory, str) or not 1 <= len(factory) <= 256:
        raise check.bad(f'"index.factory" must be the FAISS factory string of the index, got {check.short(factory)}')
    options = index.get("options", {})
    if not isinstance(options, dict):
        raise check.bad(f'"index.options" must be an object {{name: value}}, got {check.short(options)}')
    for name, value in options.items():
        if name not in OPTIONS_BY_KIND[kind]:
            raise check.bad(f'"index.options" has {check.short(name)}, which a {kind} index does not take '
                      f'(it takes {sorted(OPTIONS_BY_KIND[kind]) or "none"})')
        check.integer(value, f"index.options.{name}", 1, MAX_OPTION, "a positive integer")
    # A stored factory is used as it is, so the options that build and search it must be there
    # too (every index this package writes records all of them).
    needed = {"train_size"} if kind == "factory" else OPTIONS_BY_KIND[kind]
    missing = sorted(needed - set(options)) if "factory" in index else []
    if missing:
        raise check.bad(f'"index.options" lacks {missing}, which a stored {kind} index needs; '
                        f'restore the manifest, or delete "index.factory" and "index.options" so that the default {kind} '
                        "index is rebuilt from the stored features")


def _check_index_file(record: Optional[Dict[str, Any]], check: _Checker) -> None:
    if record is None:
        return
    check.keys(record, "index_file", ("bytes", "sha256", "count", "dim"))
    check.integer(record["bytes"], "index_file.bytes", 0, 1 << 62, "a byte count")
    check.sha256(record["sha256"], "index_file.sha256")
    check.integer(record["count"], "index_file.count", 0, MAX_ROWS, "a vector count")
    check.integer(record["dim"], "index_file.dim", 1, MAX_DIM, "a positive integer")


def _check_dataset(record: Optional[Dict[str, Any]], check: _Checker) -> None:
    if record is None:
        return
    if record.get("length") is not None:
        check.integer(record["length"], "dataset.length", 0, MAX_ROWS, "a sample count")
    for key in ("first", "last", "files"):
        check.sha256(record.get(key), f"dataset.{key}", optional=True)


def _check_shard(info: Optional[Dict[str, Any]], check: _Checker) -> None:
    """A shard's share (see :mod:`nnsim_hooks.index.sharded.shards`)."""
    if info is None:
        return
    check.keys(info, "shard", ("index", "count", "start", "stop", "total"))
    n = check.integer(info["count"], "shard.count", 1, MAX_SHARDS, "a positive integer")
    check.integer(info["index"], "shard.index", 0, n - 1, f"a shard number below shard.count = {n}")
    total = check.integer(info["total"], "shard.total", 0, MAX_ROWS, "a sample count")
    start = check.integer(info["start"], "shard.start", 0, total, f"a sample number, at most shard.total = {total}")
    check.integer(info["stop"], "shard.stop", start, total, f"a sample number from shard.start = {start}")
    check.optional_text(info.get("data"), "shard.data", MAX_TEXT)


def _check_shards(layout: Optional[Dict[str, Any]], check: _Checker) -> None:
    """The layout a merged index records (its shards' ranges)."""
    if layout is None:
        return
    check.keys(layout, "shards", ("count", "ranges"))
    n = check.integer(layout["count"], "shards.count", 1, MAX_SHARDS, "a positive integer")
    ranges = layout["ranges"]
    ok = isinstance(ranges, list) and len(ranges) == n and all(
        isinstance(r, list) and len(r) == 2 and all(is_int(x) and 0 <= x <= MAX_ROWS for x in r) and r[0] <= r[1]
        for r in ranges)
    if not ok:
        raise check.bad(f'"shards.ranges" must be {n} pairs [start, stop] of sample numbers, got {check.short(ranges)}')
    check.optional_text(layout.get("merged"), "shards.merged", 64)
