"""``nnsim_hooks.attach(model)``: the one line that makes a model answer similarity queries."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from .data import batching
from .engine.engine import Engine
from .errors import AttachError, InputError
from .exact.kernels import kernel_from_gram, normalize_features
from .engine.outputs import OutputFn, make_output_spec
from .engine.sketch import SketchRecipe, Sketcher
from .capture.targets import CoverageReport, LayerSelector, find_targets
from .validation import batch_size_of, check_attach_arguments, describe

logger = logging.getLogger(__name__)

# Which models have a live handle. Weak keys: nothing is kept alive or written on the model.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Handle]" = weakref.WeakKeyDictionary()

DEFAULT_SKETCH_DIM = 1024
DEFAULT_EXACT_LIMIT = 8192


def attach(
    model: nn.Module,
    *,
    output: Union[str, OutputFn] = "auto",
    layers: LayerSelector = None,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
    stage1_dim: Optional[int] = None,
    exact_limit: int = DEFAULT_EXACT_LIMIT,
    batch_size: int = 64,
) -> "Handle":
    """Hook ``model`` for per-sample gradients, similarities and sketched features.

    The model is not modified: parameter names, ``state_dict`` and outputs stay the
    same, and nothing is stored on modules or parameters. Use the handle as a context
    manager, or call :meth:`Handle.detach`, to remove every hook.

    Args:
        model: any ``nn.Module`` (timm, torchvision, MONAI, your own). Call
            ``model.eval()`` first if it has BatchNorm layers. A
            ``DistributedDataParallel`` (or ``DataParallel``) wrapper is unwrapped: the
            hooks go on ``model.module``.
        output: what is differentiated, the paper's f: ``"auto"`` (contrast for
            classifiers, sum otherwise), ``"contrast"``, ``"logit"``, ``"loss"``,
            ``"sum"``, ``"full"`` or ``fn(outputs, targets) -> Tensor[B] | Tensor[B, d]``.
            See :mod:`nnsim_hooks.engine.outputs`.
        layers: which modules' parameters count: None for all trainable ones, module
            names or glob patterns (a name includes everything inside that module), or
            ``fn(name, module) -> bool``.
        sketch_dim: D, the dimension of sketched features per output.
        seed: the sketch seed; the same seed gives the same features anywhere.
        stage1_dim: the first-stage sketch size shared by the large parameters (see
            :mod:`nnsim_hooks.engine.sketch`); more is more accurate and slower. None: 16 x
            sketch_dim, at least 16384.
        exact_limit: parameters with at most this many entries enter the second stage
            whole, unprojected.
        batch_size: how many samples go through the model at once when a method is given
            more than that.
    """
    if not isinstance(model, nn.Module):
        raise AttachError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_parallel(model)
    if model in _ATTACHED:
        raise AttachError(
            f"this {type(model).__name__} is already attached; detach the first handle (handle.detach(), leave "
            "its with-block, or nnsim_hooks.detach(model) if you no longer have it) before attaching again"
        )
    checked = check_attach_arguments(model, output=output, layers=layers, sketch_dim=sketch_dim, seed=seed,
                                     stage1_dim=stage1_dim, exact_limit=exact_limit, batch_size=batch_size)
    batch_size = checked.pop("batch_size")
    handle = Handle(model, output, layers, SketchRecipe(**checked), batch_size)
    _ATTACHED[model] = handle
    return handle


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers: hooks go on
    its layers, its parameter names carry no ``module.`` prefix (same fingerprint as the bare
    model), and the forward skips DDP's gradient hooks and buffer broadcasts (replicated
    inference: nothing is exchanged between ranks)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def detach(model: nn.Module) -> bool:
    """Detach whatever handle is attached to ``model`` (True if there was one)."""
    handle = _ATTACHED.get(unwrap_parallel(model))
    if handle is None:
        return False
    handle.detach()
    return True


class Handle:
    """What :func:`attach` returns. Also a context manager that detaches on exit."""

    def __init__(self, model: nn.Module, output, layers: LayerSelector, recipe: SketchRecipe, batch_size: int):
        targets, self._coverage = find_targets(model, layers)
        self.model = model
        self.recipe = recipe
        self.batch_size = batch_size
        self._layers = layers
        self._engine: Optional[Engine] = Engine(model, targets, make_output_spec(output), self._coverage)
        self._param_shapes = {
            g: tuple(t.module.get_parameter(local).shape) for t in targets for local, g in t.param_names.items()
        }
        self._sketcher: Optional[Sketcher] = None
        self._pairs = None

    # -- lifecycle ----------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every hook. Safe to call twice."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise AttachError("this handle was detached; call nnsim_hooks.attach(model) again")
        return self._engine

    @property
    def attached(self) -> bool:
        return self._engine is not None

    # -- introspection ------------------------------------------------------------------

    @property
    def coverage(self) -> CoverageReport:
        """Which modules use a fast rule, which the torch.func fallback, which are excluded."""
        return self._coverage

    @property
    def output_name(self) -> str:
        """The resolved output function (``"auto"`` until the first batch has run)."""
        return self.engine.output.name

    @property
    def wants_targets(self) -> bool:
        """Whether the output function needs targets: ``"loss"`` and user callables do; the
        other built-in outputs work label-free (predicted class)."""
        output = self.engine.output
        return output.name == "loss" or not output.builtin

    @property
    def parameter_names(self):
        return list(self._param_shapes)

    @property
    def sketcher(self) -> Sketcher:
        if self._sketcher is None:
            self._sketcher = Sketcher(self.recipe, self._param_shapes)
        return self._sketcher

    # -- per-sample gradients -----------------------------------------------------------

    def per_sample_gradients(self, inputs, targets=None) -> Dict[str, torch.Tensor]:
        """Exact per-sample gradients of the differentiated output, one batch at once.

        Returns a dict keyed by the model's own ``named_parameters()`` names with values
        ``[B, *param.shape]``, or ``[B, d, *param.shape]`` when the output function gives
        d values per sample.
        """
        engine = self.engine
        return engine.grads(engine.backprop(inputs, targets))

    # -- similarity ---------------------------------------------------------------------

    def similarity(self, a, b=None, *, targets_a=None, targets_b=None, exact: bool = True,
                   max_memory: Optional[int] = None, progress: bool = True) -> torch.Tensor:
        """The paper's similarity between every sample of ``a`` and every sample of ``b``.

        The cosine of per-sample gradients, or ``Tr(K_C)/d`` for d outputs; ``b=None``
        compares ``a`` with itself. ``exact=True`` uses no sketch (ghost inner products
        where the layer allows); ``exact=False`` uses the sketched features. A sample with
        a zero gradient has NaN similarities (and a warning).

        More samples than ``batch_size`` take one pass per batch: what each batch's
        gradients are made of (layer factors, or small per-sample gradients) is kept, in
        RAM up to ``max_memory`` bytes (None: 2 GiB) and in a temporary folder past it,
        and the Gram blocks between batches are computed from it (see
        :mod:`nnsim_hooks.exact.gram_blocks`). ``max_memory`` must hold two batches' factors.

        Returns ``Tensor[len(a), len(b)]`` (float64 when exact).
        """
        if not exact:
            fa = self.features(a, targets_a)
            fb = fa if b is None else self.features(b, targets_b)
            return fa @ fb.T
        from .exact.gram_blocks import check_max_memory

        budget = check_max_memory(max_memory)
        n_a = batch_size_of(a)
        if b is None:
            inputs, targets, n_b = a, targets_a, 0
        else:
            n_b = batch_size_of(b)
            try:
                inputs = batching.concat(a, b)
                targets = batching.concat(targets_a, targets_b)
            except (RuntimeError, ValueError) as exc:
                raise InputError(f"a and b must be batches of the same kind of input: {exc}") from exc
        gram, d = self._exact_gram(inputs, targets, n_a + n_b, budget, progress)
        rows = torch.arange(n_a, device=gram.device)
        cols = rows if b is None else torch.arange(n_a, n_a + n_b, device=gram.device)
        return kernel_from_gram(gram, d, rows, cols)

    def pair_similarity(self, a, b, *, targets_a=None, targets_b=None) -> torch.Tensor:
        """The similarity of each pair ``(a[i], b[i])``, differentiable in the parameters.

        The cosine ``g(a_i).g(b_i) / (|g(a_i)| |g(b_i)|)``, or ``Tr(K_C)/d`` for d outputs
        (whitened as in :meth:`similarity`), as a tensor ``[P]`` with a graph (double
        back-propagation), for the paper's training term (§4)::

            loss = task_loss + lam * (1 - h.pair_similarity(x_a, x_b, targets_a=y, targets_b=y)).mean()

        ``1 - k`` enforces similarity; the authors' released code adds ``+lam * k``, which
        pushes the gradients apart. All 2P inputs go through the model in one pass, in the
        model's current mode: each input gets one dropout mask, as in
        ``model(torch.cat([a, b]))``, and its gradient is that masked network's. BatchNorm
        with batch statistics raises :class:`BatchCouplingError` (see
        :func:`nnsim_hooks.training.batchnorm_running_stats`). A pair with a zero gradient
        on one side gets k = 0, with no gradient, and a warning. Under ``torch.no_grad()``
        the result has no graph. Details: :mod:`nnsim_hooks.training.pair_term`.
        """
        if self._pairs is None:
            from .training.pair_term import PairSimilarity

            self._pairs = PairSimilarity(self)
        return self._pairs(a, b, targets_a, targets_b)

    def _exact_gram(self, inputs, targets, n: int, max_memory: int, progress: bool = False):
        engine = self.engine
        if n <= self.batch_size:
            p = engine.backprop(inputs, targets)
            return engine.gram(p), p.d
        from .exact.gram_blocks import kept_gram

        result = kept_gram(engine, inputs, targets, n, self.batch_size, max_memory, progress)
        return result if result is not None else self._pair_gram(inputs, targets, n)

    def _pair_gram(self, inputs, targets, n: int):
        """Every pair of half-batches through the model together: memory bounded by
        ``batch_size`` and nothing kept, but O((n / batch_size)^2) passes. Cheaper only in
        memory, never in passes, so it runs only for models whose batches are not made of
        the same parts (calls that change with the data), whose kept factors cannot be paired."""
        engine = self.engine
        half = max(1, self.batch_size // 2)
        blocks = list(batching.chunks(n, half))
        full = None
        d = 1
        for i, (s0, e0) in enumerate(blocks):
            for s1, e1 in blocks[i:]:
                idx = torch.cat([torch.arange(s0, e0), torch.arange(s1, e1)]) if s1 != s0 else torch.arange(s0, e0)
                p = engine.backprop(batching.take(inputs, idx), batching.take(targets, idx))
                d = p.d
                if full is None:
                    full = torch.zeros(n, d, n, d, dtype=torch.float64, device=p.values.device)
                g = engine.gram(p).reshape(len(idx), d, len(idx), d)
                full[idx[:, None], :, idx[None, :], :] = g.permute(0, 2, 1, 3)
        return full.reshape(n * d, n * d), d

    # -- exact dataset-scale sums ---------------------------------------------------------

    def density(self, data, *, include_self: bool = True, batch_size: Optional[int] = None,
                progress: bool = True, use_targets: Optional[bool] = None):
        """The paper's soft neighbour count ``N_S(x_i) = sum_j k(x_i, x_j)`` over ``data``,
        exactly: no sketch, and no per-sample gradient held for factored layers.

        Two passes over ``data`` (a tensor, Dataset, DataLoader that does not shuffle, or
        iterable of batches, as for :meth:`build_index`): the first sums the unit
        gradients, ``S = sum_j g_j / |g_j|`` (for d outputs the whitened
        ``J_j^T K_jj^{-1/2}``, giving ``Tr(K_C)/d``), the second takes each sample's
        product with it. ``include_self=False`` leaves out ``k_ii = 1``. Samples with a
        zero gradient are NaN (and a warning names them). Holds d parameter-sized sums.
        ``use_targets``: pass the data's targets to the output function (None: when it
        needs them, as for :meth:`build_index`).

        Returns numpy float64 ``[N]`` in data order.
        """
        from .exact.dataset_kernel import exact_density

        return exact_density(self, data, include_self, batch_size, progress, use_targets)

    def consistency(self, data, values=None, *, include_self: bool = True, batch_size: Optional[int] = None,
                    progress: bool = True, return_average: bool = False, use_targets: Optional[bool] = None):
        """The label-free check of the averaging hypothesis (the paper, §3), exactly, on the raw
        kernel ``K_ij = g_i . g_j``: ``|p_i - sum_j K_ij p_j / sum_j K_ij|`` (numpy
        float64 ``[N]``, NaN where the denominator is 0).

        ``values`` ``[N, C]``: what is averaged; None: the model's softmax for classifier
        outputs (contrast, logit, loss), else its flattened outputs. Two passes, with
        C + 1 parameter-sized sums ``sum_j g_j p_j^T`` and ``sum_j g_j``. For d > 1
        differentiated outputs the kernel is the d x d ``J_i J_j^T`` (the authors'
        matrix form) and ``values`` must have d columns. ``return_average=True`` also
        returns the kernel-weighted averages ``[N, C]``.
        """
        from .exact.dataset_kernel import exact_consistency

        return exact_consistency(self, data, values, include_self, batch_size, progress, return_average, use_targets)

    # -- sketched features --------------------------------------------------------------

    @property
    def feature_dim(self) -> Optional[int]:
        """Width of :meth:`features` rows: ``sketch_dim`` for a scalar output, ``d*sketch_dim``
        for d outputs (known once a batch has run for ``output="full"``)."""
        return self._feature_dim if hasattr(self, "_feature_dim") else None

    def features(self, inputs, targets=None) -> torch.Tensor:
        """Sketched, unit-norm features ``[B, feature_dim]``: inner products of rows estimate
        :meth:`similarity`. Rows of samples without a gradient direction are NaN."""
        return self.extract(inputs, targets).features

    def extract(self, inputs, targets=None) -> "FeatureBatch":
        """Features plus what an index stores beside them (norms, outputs, predictions)."""
        n = batch_size_of(inputs)
        if n == 0:
            raise InputError(
                f"inputs hold no samples ({describe(inputs)}): features need a batch of at least one sample "
                "[B >= 1, ...]; skip empty batches before calling"
            )
        parts = []
        for start, end in batching.chunks(n, self.batch_size):
            idx = slice(start, end)
            parts.append(self._extract_batch(batching.take(inputs, idx), batching.take(targets, idx)))
        return FeatureBatch.join(parts)

    def _extract_batch(self, inputs, targets) -> "FeatureBatch":
        engine = self.engine
        p = engine.backprop(inputs, targets)
        sketched = engine.sketch(p, self.sketcher)
        features, norms, undefined = normalize_features(sketched)
        if bool(undefined.any()):
            import warnings

            warnings.warn(
                f"nnsim_hooks: samples {undefined.nonzero().flatten()[:10].tolist()} of this batch have a zero or "
                "degenerate gradient; their feature rows are NaN",
                RuntimeWarning,
                stacklevel=3,
            )
        self._feature_dim = features.shape[1]
        outputs = p.outputs if torch.is_tensor(p.outputs) else None
        return FeatureBatch(features.detach(), norms.detach(), undefined, outputs, p.values)

    # -- index --------------------------------------------------------------------------

    def fingerprint(self) -> Dict[str, Any]:
        """What must match for a stored index to be reused with this handle."""
        from .index.folder.model_fingerprint import model_fingerprint

        return {
            "model": model_fingerprint(self.model, self.parameter_names),
            "output": self.output_name,
            "layers": sorted(self._param_shapes),
            "sketch": self.recipe.to_dict(),
        }

    def build_index(self, data, path=None, **options):
        """Extract features for a whole dataset into a FAISS index; see
        :func:`nnsim_hooks.index.build_index` for ``data`` and ``options``."""
        from .index import build_index

        return build_index(self, data, path, **options)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<nnsim_hooks.Handle {state} to {type(self.model).__name__}: {self._coverage.summary()}>"


class FeatureBatch:
    """Features of a batch and what goes beside them in an index."""

    def __init__(self, features, norms, undefined, outputs, values):
        self.features = features  # [B, F]
        self.norms = norms  # [B] estimated gradient norm
        self.undefined = undefined  # [B] bool
        self.outputs = outputs  # model outputs [B, ...] or None
        self.values = values  # differentiated values [B, d]

    @staticmethod
    def join(parts) -> "FeatureBatch":
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
        return FeatureBatch(
            cat([p.features for p in parts]),
            cat([p.norms for p in parts]),
            cat([p.undefined for p in parts]),
            cat([p.outputs for p in parts]),
            cat([p.values for p in parts]),
        )
