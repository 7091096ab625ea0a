"""The WebDataset layout: tar shards (``data.tar``, or a brace pattern such as
``shards-{000..003}.tar``), each sample the tar members that share a key
(``0001.png``, ``0001.cls``).

The pattern is expanded and the keys are split off the member names with webdataset's
own functions (``shardlists.expand_urls``, ``tariterators.base_plus_ext``), non-image
members (``cls``, ``txt``, ``json``, ``npy``) are decoded by its ``basichandlers``; images
are decoded by the image rules of :mod:`..images` (webdataset's image handler would turn
16-bit images into 8-bit RGB). To read any sample by its index (the audit's extraction
resumes by sample index), one pass over each tar's headers records where each member
lies; the order is the shards' order, then the tar's. Samples are named
``<shard file>/<key>``.

A truncated shard (a member that ends past the end of the file, or a file that stops
before the tar's end-of-archive blocks): the sample being read at the cut is unreadable,
counted and skipped by the audit as unreadable files are, with the shard named; the
samples that followed it in the shard are gone with the missing bytes and are not
listed. The image member (``--image-column``, e.g. ``png``) and the label member
(``--label-column``, e.g. ``cls``) are taken by extension; left out, they are the one
image (or ``npy``) extension of the shards and ``cls`` (else ``label``, ``class``,
``target``; none: unlabelled).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nnsim_hooks.errors import DataError, InputError
from nnsim_hooks.optional import require

from ..files import IMAGE_EXTENSIONS, SHOW
from ..labels import parse_labels
from ..listing import Layout, Listing

logger = logging.getLogger(__name__)

LABEL_MEMBERS = ("cls", "label", "class", "target")
ARRAY_MEMBERS = ("npy",)
_IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BLOCK = tarfile.BLOCKSIZE
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: keys it skips entirely


@dataclass
class ShardSample:
    """One sample of a shard: where its members lie, and why it cannot be read (if so)."""

    shard: int
    key: str
    members: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # extension -> (offset, size)
    problem: Optional[str] = None


def is_shards(path: str) -> bool:
    """A ``.tar`` file or a pattern of them (brace expansion, ``::``-separated lists)."""
    text = os.fspath(path)
    return text.lower().endswith(".tar") and (os.path.isfile(text) or "{" in text or "::" in text)


def shard_files(pattern: str) -> List[str]:
    """The shards ``pattern`` names (webdataset's expansion), each checked to exist."""
    require("webdataset", "reading WebDataset shards")
    from webdataset.shardlists import expand_urls

    shards = list(expand_urls(os.fspath(pattern)))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(shards)} shards of '{pattern}' do not exist, for example: "
                        + ", ".join(missing[:SHOW]))
    return shards


def index_shard(path: str, number: int) -> Tuple[List[ShardSample], Optional[str]]:
    """The samples of one shard, and what is wrong with it when it is truncated."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    samples: List[ShardSample] = []
    problem = None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, extension = base_plus_ext(info.name) if info.isreg() else (None, None)
                if key is None or _META.match(info.name):
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(number, key))
                end = info.offset_data + info.size
                if end > size:
                    problem = f"member '{info.name}' ends at byte {end} but the file has {size} bytes"
                    break
                samples[-1].members[extension.lower()] = (info.offset_data, info.size)
            else:
                # a whole tar ends with two zero blocks after its last member
                if samples and size - tar.offset < 2 * _BLOCK:
                    problem = (f"it stops {size - tar.offset} bytes after member data (the end-of-archive "
                               "blocks are missing)")
        state = "truncated"
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem, state = f"{type(exc).__name__}: {exc}", "truncated or damaged"
    if problem is not None:
        problem = f"shard '{path}' is {state}: {problem}"
        if samples:
            samples[-1].problem = problem + f"; sample '{samples[-1].key}' was being read at the cut"
        logger.warning("%s; the samples after '%s' are lost with the missing bytes", problem,
                       samples[-1].key if samples else "its start")
    return samples, problem


def _member(samples: Sequence[ShardSample], given: Optional[str], candidates: Sequence[str], role: str, flag: str,
            where: str, required: bool) -> Optional[str]:
    """The member extension ``given`` (checked to exist), else the one candidate present."""
    present = sorted({e for s in samples for e in s.members})
    if given is not None:
        if given.lower() not in present:
            raise InputError(f"{where}: no sample has a '{given}' member ({flag}); the members there are {present}")
        return given.lower()
    found = [e for e in candidates if e in present]
    if role == "label":
        found = found[:1]  # cls first
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"{where}: several members could be the {role} ({found}); choose one with {flag}")
    if required:
        raise InputError(f"{where}: no member is an image ({', '.join(_IMAGE_MEMBERS[:6])}...) or an array (npy); "
                         f"name it with {flag}; the members there are {present}")
    return None


def _read(path: str, place: Tuple[int, int]) -> bytes:
    offset, size = place
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _decode(extension: str, data: bytes):
    """Images as bytes (decoded by this package's image rules), the rest by webdataset's
    ``basichandlers`` (``cls`` -> int, ``npy`` -> array, ``txt`` -> str...)."""
    if extension.rsplit(".", 1)[-1] in _IMAGE_MEMBERS:
        return data
    from webdataset.autodecode import basichandlers

    value = basichandlers("." + extension, data)
    return data if value is None else value


def _label_text(value) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return value.strip() if isinstance(value, str) else value


def open_shards(pattern, loaded=None, config=None, classes: Optional[Sequence[str]] = None, *,
                image_column: Optional[str] = None, label_column: Optional[str] = None):
    """A :class:`~nnsim_hooks.integrations.records.RecordDataset` of the shards (see the
    module docstring)."""
    from ..config import DataConfig
    from ..records import RecordDataset

    pattern = os.fspath(pattern)
    shards = shard_files(pattern)
    samples: List[ShardSample] = []
    truncated = []
    for number, shard in enumerate(shards):
        found, problem = index_shard(shard, number)
        samples += found
        if problem:
            truncated.append(shard)
    where = f"the WebDataset shards '{pattern}'"
    if not samples:
        raise DataError(f"{where} hold no samples")
    image = _member(samples, image_column, _IMAGE_MEMBERS + ARRAY_MEMBERS, "image", "--image-column", where, True)
    label = _member(samples, label_column, LABEL_MEMBERS, "label", "--label-column", where, False)
    names = [f"{os.path.basename(shards[s.shard])}/{s.key}" for s in samples]
    if label is None:
        labels, class_names = [-1] * len(samples), list(classes) if classes is not None else []
    else:
        raw = [_label_text(_read(shards[s.shard], s.members[label])) if label in s.members else None
               for s in samples]
        labels, class_names = parse_labels(raw, names, f"{where}, member '{label}'", classes)

    def fetch(position: int):
        sample = samples[position]
        if sample.problem is not None:
            raise DataError(sample.problem)
        if image not in sample.members:
            raise DataError(f"sample '{sample.key}' of shard '{shards[sample.shard]}' has no '{image}' member "
                            f"(it has {sorted(sample.members)})")
        return _decode(image, _read(shards[sample.shard], sample.members[image]))

    dataset = RecordDataset(names, labels, config or DataConfig(mean=None, std=None), fetch, classes=class_names,
                            loaded=loaded, layout="webdataset", source=pattern)
    dataset.shards = shards
    dataset.truncated_shards = truncated
    return dataset


def list_shards(pattern: str, classes: Optional[Sequence[str]] = None, **options) -> Listing:
    """The samples' names and labels (see :func:`open_shards`)."""
    dataset = open_shards(pattern, classes=classes, **options)
    return Listing(list(dataset.paths), list(dataset.labels), list(dataset.classes), layout="webdataset")


LAYOUT = Layout(
    name="webdataset",
    recognises=is_shards,
    what="WebDataset .tar shards (a file or a brace pattern)",
    help="WebDataset tar shards (shards-{000..003}.tar)",
    list_samples=list_shards,
    options=("image_column", "label_column"),
    suffixes=(".tar",),
    opens=open_shards,
    patterns=True,
)
