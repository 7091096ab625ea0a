"""Dataset audits through the trained network's own similarity.

    >>> result = nnsim_hooks.audit(model, dataset, out_dir="audit/")
    >>> result.table                 # one row per sample
    >>> result.label_issues()        # suspected wrong labels, worst first
    >>> result.knn_graph()           # for cleanlab's Datalab(knn_graph=...)

Modules: :mod:`.run` (``audit()``), :mod:`.analysis` (``analyse()``: the checks on a built
index), :mod:`.checks` (one module per check and the registry ``CHECKS``; a new check is
one module there plus one line in the registry), :mod:`.thresholds`, :mod:`.result`
(``AuditResult``, the saved folder), :mod:`.report` (HTML), :mod:`.explorer` (the report's
table of every sample, its script ``explorer.js``), :mod:`.ranking` (the suspects' order),
:mod:`.decisions` (the report's exported decisions, applied by the next audit),
:mod:`.presentation` (numbers and pictures in the report and the printed summary),
:mod:`.plots`, :mod:`.thumbnails`
(pluggable pictures), :mod:`.samples` (labels, unreadable files), :mod:`.output_folder`
(output folders), :mod:`.output_choice` (what is differentiated), :mod:`.demo` (the
embedded default).
"""

from .result import AuditResult
from .analysis import analyse
from .run import audit
from .thresholds import Thresholds
from .thumbnails import default_thumbnailer, register_thumbnailer, unregister_thumbnailer

__all__ = [
    "audit",
    "analyse",
    "AuditResult",
    "Thresholds",
    "register_thumbnailer",
    "unregister_thumbnailer",
    "default_thumbnailer",
]


def _make_callable() -> None:
    """``nnsim_hooks.audit(model, dataset)`` calls :func:`audit` while ``nnsim_hooks.audit``
    stays this package (so ``nnsim_hooks.audit.demo`` and friends keep working)."""
    import sys
    import types

    class _AuditModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return audit(*args, **kwargs)

    sys.modules[__name__].__class__ = _AuditModule


_make_callable()
