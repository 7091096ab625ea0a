"""Seeded random Gaussian sketches of per-sample gradients.

Two stages (the idea of LoGra and Captum's TracInCPFastRandProj, then a dense stage):

1. **Per parameter, Kronecker-factored.** A parameter with at most ``exact_limit``
   entries is kept whole, unprojected. A larger one is viewed as a matrix
   ``rows x cols`` (``shape[0] x prod(shape[1:])``) and gets an even share of
   ``stage1_dim`` (at least ``min_param_dim``). Its per-sample gradient is
   ``G = sum_u delta_u a_u^T`` for linear and conv layers, so a sketch
   ``S_row G S_col^T = sum_u (S_row delta_u)(S_col a_u)^T`` is formed from the two
   hook factors without ever forming ``G``. The share is spent on ``repeats``
   independent ``block x block`` Kronecker sketches (averaged), or, when one side is
   at most ``block`` long, that side is kept exactly and the other one projected.
   Kronecker sketches of a gradient with few positions (rank one at the end of a CNN)
   are noisier than a dense Gaussian of the same size, the more so the larger the
   blocks, while the work per first-stage dimension halves when the block side doubles.
   The default is 4x4 up to D = 1024 and 2x2 above (``default_block``): with
   ``stage1_dim = 16 D`` that keeps the error within about 1.1x of an ideal dense
   Gaussian sketch at D = 256 to 4096 on resnet18 and a ViT, where 4x4 blocks reached
   1.2-1.5x at D = 4096; 2x2 blocks cost about 2.4x the first-stage time of 4x4 ones.
2. **Sparse signed hashing to ``dim``.** The per-parameter sketches (``M`` numbers in
   all) are mapped to ``dim``: the outputs are cut into ``s = HASH_NONZEROS`` (4) blocks
   of about ``dim / s`` coordinates, and each of the M coordinates is added, with a
   random sign and a weight ``1/sqrt(s)``, to one random coordinate of every block: the
   average of s independent CountSketches. This is an unbiased inner-product sketch
   whose variance is that of one CountSketch into ``dim`` buckets, at most a dense
   Gaussian's for every pair of vectors (``(|a|^2 |b|^2 + (a.b)^2 - 2 sum_i a_i^2 b_i^2)
   / dim``), in O(s M) per sample instead of O(M dim), so the first stage can grow with
   ``dim``: ``stage1_dim`` defaults to ``STAGE1_PER_DIM * dim`` (at least
   ``MIN_STAGE1_DIM``). With a single nonzero (plain CountSketch, recipe version 3) the
   error had the same mean but a heavier tail from seed to seed on gradients whose mass
   sits in a few coordinates (clustered inputs); spreading every coordinate over s blocks
   averages such collisions out. When ``M <= dim`` nothing is projected: the rows are
   padded with zeros and the features are exact.

The error of the sketched cosine is the ideal dense Gaussian's (from stage 2) plus what
stage 1 adds, which shrinks as ``stage1_dim / dim`` grows; see the benchmark table
``benchmarks/results/gradients_cpu.md`` for the error against D.

Seed recipe (version 4), written into every index manifest: each matrix is drawn with
``torch.randn(shape, generator=g, dtype=float32)`` on the CPU, where ``g`` is seeded
with the first 8 bytes (little-endian, masked to 63 bits) of
``sha256("nnsim_hooks/sketch/v4|{seed}|{parameter name}|{role}")`` and ``role`` is
``row`` or ``col``; it is then scaled by ``1/sqrt(k)``, ``k`` the number of its rows.
Stage 2 draws, from a generator seeded the same way with role ``hash``, for each block
``j = 0 .. s-1`` (``s = min(HASH_NONZEROS, dim)``, block j covering outputs
``[j*dim//s, (j+1)*dim//s)``): ``torch.randint(size_j, (m,))`` (the coordinate within
the block of each of the parameter's m stage-1 coordinates) and then
``torch.randint(2, (m,))`` (its sign, 0 -> -1). The same
seed therefore gives the same matrices on any machine and device, and each matrix is
independent of which other parameters are sketched. Indexes built with another recipe
version are refused.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

RECIPE_VERSION = 4
#: stage 2 adds every stage-1 coordinate to this many outputs (one per block of dim / s)
HASH_NONZEROS = 4
#: the default first-stage size is this many times ``dim`` ...
STAGE1_PER_DIM = 16
#: ... and at least this
MIN_STAGE1_DIM = 16384
#: above this ``dim`` the default Kronecker blocks are 2x2 instead of 4x4
SMALL_BLOCK_ABOVE = 1024
#: factors with at least this many positions are projected one sample at a time (see _apply)
BATCHED_MIN_POSITIONS = 32
#: a table ``[few, N, C]`` with more entries per row than this is folded (see matrix_view)
FOLD_COLS = 1 << 16


@dataclass(frozen=True)
class SketchRecipe:
    """Everything that determines the random matrices; stored in index manifests."""

    dim: int
    seed: int = 0
    #: total first-stage size shared by the parameters that are projected; None:
    #: ``max(MIN_STAGE1_DIM, STAGE1_PER_DIM * dim)`` (resolved here, stored resolved)
    stage1_dim: Optional[int] = None
    #: parameters with at most this many entries are kept whole (exact)
    exact_limit: int = 8192
    #: no projected parameter gets fewer first-stage dimensions than this
    min_param_dim: int = 256
    #: side of the Kronecker blocks (see factor_dims); None: ``default_block(dim)``
    block: Optional[int] = None
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.stage1_dim is None:
            object.__setattr__(self, "stage1_dim", default_stage1_dim(self.dim))
        if self.block is None:
            object.__setattr__(self, "block", default_block(self.dim))

    def to_dict(self) -> dict:
        return asdict(self)


def default_stage1_dim(dim: int) -> int:
    return max(MIN_STAGE1_DIM, STAGE1_PER_DIM * int(dim))


def default_block(dim: int) -> int:
    """4x4 Kronecker blocks up to D = 1024, 2x2 above: smaller blocks are more accurate on
    gradients with few positions but cost twice as much for the same first-stage size;
    above D = 1024 the first-stage error would otherwise dominate (see the module docstring)."""
    return 4 if int(dim) <= SMALL_BLOCK_ABOVE else 2


def _generator(seed: int, name: str, role: str) -> torch.Generator:
    digest = hashlib.sha256(f"nnsim_hooks/sketch/v{RECIPE_VERSION}|{seed}|{name}|{role}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def seeded_hash(seed: int, name: str, m: int, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 for one parameter: the output coordinates ``[s, m]`` (int64, row j in block
    j) and the signs ``[s, m]`` (float32, +-1) of each of its m stage-1 coordinates, drawn
    by the recipe above (``s = min(HASH_NONZEROS, dim)``)."""
    generator = _generator(seed, name, "hash")
    s = min(HASH_NONZEROS, dim)
    buckets, signs = [], []
    for j in range(s):
        low, high = j * dim // s, (j + 1) * dim // s
        buckets.append(torch.randint(high - low, (m,), generator=generator) + low)
        signs.append(torch.randint(2, (m,), generator=generator).float().mul_(2).sub_(1))
    return torch.stack(buckets), torch.stack(signs)


def seeded_gaussian(seed: int, name: str, role: str, shape: Sequence[int], std: float) -> torch.Tensor:
    """A CPU float32 matrix of iid N(0, std^2) entries, drawn by the recipe above."""
    matrix = torch.randn(tuple(shape), generator=_generator(seed, name, role), dtype=torch.float32)
    return matrix.mul_(std)


def matrix_view(shape: Sequence[int], block: int = 4) -> Tuple[int, int]:
    """How a parameter of this shape is seen as a matrix: (shape[0], rest).

    Except a table of three or more dimensions with at most ``block`` rows and more than
    ``FOLD_COLS`` entries per row (a ViT's ``[1, tokens, C]`` position table): it is seen
    as ``(prod(shape[:-1]), shape[-1])``, because projecting one very long side would take
    a ``[budget, tokens * C]`` Gaussian matrix (gigabytes for large position tables).
    No layer with a factored rule has such a weight.
    """
    if len(shape) == 0:
        return 1, 1
    rows, cols = int(shape[0]), int(math.prod(shape[1:]))
    if len(shape) >= 3 and rows <= block and cols > FOLD_COLS:
        return int(math.prod(shape[:-1])), int(shape[-1])
    return rows, cols


def factor_dims(rows: int, cols: int, budget: int, k: int) -> Tuple[int, int, int]:
    """(repeats, k_row, k_col) for a ``rows x cols`` parameter and a first-stage budget.

    Small parameters are kept whole. A side of at most ``k`` is kept exactly and the
    other side gets the whole budget. Otherwise the budget is spent on independent
    ``k x k`` Kronecker blocks: for the same size, many small blocks estimate inner
    products of low-rank gradients (few positions, as late conv layers have) with far
    less variance than one large block.
    """
    if rows * cols <= budget:
        return 1, rows, cols
    if rows <= k:
        return 1, rows, max(1, min(cols, budget // rows))
    if cols <= k:
        return 1, max(1, min(rows, budget // cols)), cols
    return max(1, budget // (k * k)), k, k


def split_budget(recipe: "SketchRecipe", param_shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """First-stage size per parameter: whole for small ones, an even share of
    ``stage1_dim`` (at least ``min_param_dim``) for the others."""
    sizes = {n: int(math.prod(s)) for n, s in param_shapes.items()}
    big = [n for n, p in sizes.items() if p > recipe.exact_limit]
    out = {n: p for n, p in sizes.items() if p <= recipe.exact_limit}
    for n in big:
        out[n] = max(recipe.min_param_dim, recipe.stage1_dim // len(big))
    return out


@dataclass
class ParamSketch:
    """The stage-1 sketch of one parameter.

    ``repeats`` independent Kronecker blocks ``S_row^q G S_col^q^T`` (q = 1..repeats),
    stacked as ``row_matrix`` ``[repeats*k_row, rows]`` and ``col_matrix``
    ``[repeats*k_col, cols]``; None means that side is kept exactly (then repeats = 1).
    The row matrix carries the ``1/sqrt(repeats)`` that averages the blocks.
    """

    name: str
    shape: Tuple[int, ...]
    rows: int
    cols: int
    repeats: int
    row_matrix: Optional[torch.Tensor]
    col_matrix: Optional[torch.Tensor]
    _cache: Dict[Tuple[torch.device, torch.dtype], "ParamSketch"] = field(default_factory=dict, repr=False)

    @property
    def k_row(self) -> int:
        return self.rows if self.row_matrix is None else self.row_matrix.shape[0] // self.repeats

    @property
    def k_col(self) -> int:
        return self.cols if self.col_matrix is None else self.col_matrix.shape[0] // self.repeats

    @property
    def out_dim(self) -> int:
        return self.repeats * self.k_row * self.k_col

    @property
    def projected(self) -> bool:
        return self.row_matrix is not None or self.col_matrix is not None

    def to(self, device: torch.device, dtype: torch.dtype) -> "ParamSketch":
        """This sketch with its matrices on ``device`` (cached)."""
        key = (torch.device(device), dtype)
        if key not in self._cache:
            move = lambda m: None if m is None else m.to(device=device, dtype=dtype)  # noqa: E731
            self._cache[key] = ParamSketch(
                self.name, self.shape, self.rows, self.cols, self.repeats, move(self.row_matrix), move(self.col_matrix)
            )
        return self._cache[key]

    def rows_of(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Apply the stacked S_row along ``dim`` of ``x`` (size ``rows`` there)."""
        return _apply(self.row_matrix, x, dim)

    def cols_of(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Apply the stacked S_col along ``dim`` of ``x`` (size ``cols`` there)."""
        return _apply(self.col_matrix, x, dim)

    def combine_factors(self, row_factor: torch.Tensor, col_factor: torch.Tensor) -> torch.Tensor:
        """``sum_u (S_row delta_u)(S_col a_u)^T`` block by block.

        ``row_factor`` is ``[d_r, B, repeats*k_row, L]`` and ``col_factor``
        ``[d_c, B, repeats*k_col, L]`` with ``d_r, d_c`` in ``{1, d}``; returns
        ``[B, d, out_dim]``.
        """
        d = max(row_factor.shape[0], col_factor.shape[0])
        b, length = row_factor.shape[1], row_factor.shape[-1]
        p = row_factor.reshape(row_factor.shape[0], b, self.repeats, self.k_row, length)
        q = col_factor.reshape(col_factor.shape[0], b, self.repeats, self.k_col, length)
        # one batched product of [k_row, L] by [L, k_col] blocks, on the factors as they are
        out = torch.matmul(p, q.transpose(-2, -1))  # [d, B, repeats, k_row, k_col]
        return out.transpose(0, 1).reshape(b, d, self.out_dim)

    def project_gradients(self, grads: torch.Tensor) -> torch.Tensor:
        """Sketch materialised per-sample gradients ``[B, d, *shape]`` -> ``[B, d, out_dim]``."""
        lead = grads.shape[:2]
        g = self.rows_of(grads.reshape(-1, self.rows, self.cols), 1)  # [N, R*k_row, cols]
        if self.col_matrix is not None:
            g = g.reshape(g.shape[0], self.repeats, self.k_row, self.cols)
            cols = self.col_matrix.reshape(self.repeats, self.k_col, self.cols)
            g = torch.einsum("nqrc,qkc->nqrk", g, cols)
        return g.reshape(*lead, self.out_dim)


def _apply(matrix: Optional[torch.Tensor], x: torch.Tensor, dim: int) -> torch.Tensor:
    if matrix is None:
        return x
    if dim == x.dim() - 2 and x.shape[-1] >= BATCHED_MIN_POSITIONS:
        # [..., n, L] -> [..., k, L], one product per sample: no copy in or out
        return torch.matmul(matrix, x)
    # Few positions: one large product over all samples and positions (small per-sample
    # products are slow), laid out back as the factors were, in one copy.
    x = x.movedim(dim, -1)
    return (x @ matrix.T).movedim(-1, dim).contiguous()


class Sketcher:
    """All the matrices of one recipe for one list of parameters (name -> shape)."""

    def __init__(self, recipe: SketchRecipe, param_shapes: Dict[str, Tuple[int, ...]]):
        if recipe.dim < 1 or recipe.stage1_dim < 1 or recipe.exact_limit < 0:
            raise ValueError(
                f"sketch sizes must be positive, got dim={recipe.dim}, stage1_dim={recipe.stage1_dim}, "
                f"exact_limit={recipe.exact_limit} (attach(sketch_dim=..., stage1_dim=..., exact_limit=...))"
            )
        self.recipe = recipe
        self.params: Dict[str, ParamSketch] = {}
        self.offsets: Dict[str, int] = {}
        budgets = split_budget(recipe, param_shapes)
        total = 0
        for name, shape in param_shapes.items():
            rows, cols = matrix_view(shape)
            repeats, k_row, k_col = factor_dims(rows, cols, budgets[name], recipe.block)
            row_m = col_m = None
            if k_row < rows:
                std = 1.0 / math.sqrt(k_row * repeats)
                row_m = seeded_gaussian(recipe.seed, name, "row", (repeats * k_row, rows), std)
            if k_col < cols:
                col_m = seeded_gaussian(recipe.seed, name, "col", (repeats * k_col, cols), 1.0 / math.sqrt(k_col))
            self.params[name] = ParamSketch(name, tuple(shape), rows, cols, repeats, row_m, col_m)
            self.offsets[name] = total
            total += self.params[name].out_dim
        #: total stage-1 dimension M
        self.stage1_dim = total
        #: True when stage 2 is a zero padding (the features are exact)
        self.exact = total <= recipe.dim and not any(p.projected for p in self.params.values())
        self._hash: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._hash_cache: Dict[Tuple[torch.device, torch.dtype], Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def dim(self) -> int:
        return self.recipe.dim

    def param_sketches(self, names: List[str], device, dtype) -> Dict[str, ParamSketch]:
        return {n: self.params[n].to(device, dtype) for n in names}

    def _hash_of(self, name: str, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (torch.device(device), dtype)
        cached = self._hash_cache.setdefault(key, {})
        if name not in cached:
            if name not in self._hash:
                self._hash[name] = seeded_hash(self.recipe.seed, name, self.params[name].out_dim, self.dim)
            buckets, signs = self._hash[name]
            weight = 1.0 / math.sqrt(buckets.shape[0])  # the average of s CountSketches
            cached[name] = (buckets.reshape(-1).to(device), signs.mul(weight).to(device=device, dtype=dtype))
        return cached[name]

    def combine(self, parts: Dict[str, torch.Tensor], batch: int, d: int, device, dtype) -> torch.Tensor:
        """Stage 2: per-parameter sketches ``[B, d, m_l]`` -> ``[B, d, dim]``."""
        out = torch.zeros(batch, d, self.dim, device=device, dtype=dtype)
        if self.stage1_dim <= self.dim:
            for name, part in parts.items():
                off = self.offsets[name]
                out[:, :, off : off + part.shape[-1]] += part
            return out
        for name, part in parts.items():
            buckets, signs = self._hash_of(name, device, dtype)  # [s*m], [s, m]
            out.index_add_(2, buckets, (part.unsqueeze(2) * signs).reshape(batch, d, -1))
        return out
