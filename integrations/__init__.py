"""Model sources and data layouts people already use: timm, torchvision, MONAI.

    >>> from nnsim_hooks.integrations import load_model, load_dataset
    >>> loaded = load_model("timm:resnet18", num_classes=10)          # or torchvision:NAME,
    >>> data = load_dataset("photos/", loaded)                        # monai:NAME, a bundle...
    >>> with loaded.attach() as handle:
    ...     features = handle.features(torch.stack([data[i][0] for i in range(8)]))

The core never imports this package, and importing it imports neither timm nor MONAI:
each adapter loads its library when it is first used, and says which extra to install
(``pip install 'nnsim_hooks[timm]'``, ``'nnsim_hooks[monai]'``) when it is missing.
Dataset layouts (folder, CSV, MONAI datalist, Hugging Face datasets, WebDataset shards,
FiftyOne datasets) are a registry, one module each, in :mod:`.layouts`;
:func:`export_to_fiftyone` writes an audit's columns into a FiftyOne dataset's fields. timm's fast layer rules are registered by :func:`register_timm_rules`, which
``load_model("timm:...")`` and ``import nnsim_hooks.integrations.timm`` call.
"""

from __future__ import annotations

from .checkpoints import load_checkpoint
from .config import DataConfig, LoadedModel
from .datasets import FileDataset, load_dataset
from .input_size import check_data_size, with_input_size
from .layouts.fiftyone_dataset import export_to_fiftyone
from .models import infer_data_config, load_model, parse_model_kwargs
from .dense_outputs import foreground_sum, per_class, region_sum
from nnsim_hooks.audit.thumbnails import thumbnail_of

__all__ = [
    "load_model",
    "load_dataset",
    "with_input_size",
    "check_data_size",
    "export_to_fiftyone",
    "LoadedModel",
    "DataConfig",
    "FileDataset",
    "load_checkpoint",
    "infer_data_config",
    "parse_model_kwargs",
    "foreground_sum",
    "region_sum",
    "per_class",
    "thumbnail_of",
    "register_timm_rules",
    "timm_layers",
]


def __getattr__(name):
    # timm-specific helpers import timm: load them only when asked for.
    if name == "register_timm_rules":
        from .timm_rules import register_timm_rules

        return register_timm_rules
    if name == "timm_layers":
        from .timm import timm_layers

        return timm_layers
    raise AttributeError(f"module 'nnsim_hooks.integrations' has no attribute {name!r}")
