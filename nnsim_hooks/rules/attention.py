"""nn.MultiheadAttention: per-sample gradients of its projections from q, k, v.

Attention needs the whole call (query, key, value, masks), not just a first input: the
rule reads it through :meth:`LayerRule.operands`. For the captured batch it recomputes
the projections ``q, k, v`` and the softmax, then back-propagates the captured output
gradient through that recomputation only (in closed form: no autograd, every one of
the d outputs at once), which gives the gradient ``delta`` at each projection's output.
Every weight of the module is then a factored layer, ``grad W = sum_t delta_t x_t^T``
(``in_proj_weight`` stacks the q, k and v rows; ``out_proj.weight`` takes the context
vectors), so Gram matrices and sketches come from the shared factored code without
materialising ``[B, 3E, E]`` gradients; biases, ``bias_k`` and ``bias_v`` are small
vectors. ``out_proj`` never runs (the module reads its weight itself), so the rule also
takes ``out_proj.weight`` and ``out_proj.bias`` (see :meth:`LayerRule.child_parameters`).

When the call is plain packed self-attention (``query is key is value``, one
``in_proj_weight``, no ``bias_k``), nothing is recomputed: the rule finds the two matrix
products of the call in its autograd graph (the in-projection and ``out_proj``; see
:meth:`MultiheadAttentionRule.tap_graph`), keeps their saved inputs, and the capture
hooks their output gradients, which autograd computes anyway. Both weights are then
factored exactly like two ``nn.Linear`` layers, at the cost of their sketch alone.
Any other configuration, or a graph that does not look as expected, takes the
recomputation below.

Handled: ``batch_first`` either way (sequence-first input has the batch in dim 1),
``kdim``/``vdim`` other than ``embed_dim`` (separate ``q/k/v_proj_weight``),
``bias=False``, ``add_bias_kv``, ``add_zero_attn``, ``key_padding_mask`` and
``attn_mask`` (bool or float, 2-D or per head), ``is_causal``, ``need_weights`` (the
weights' own gradient, averaged over heads or not). Dropout in training mode draws
masks the rule cannot replay: it is refused. Subclasses of nn.MultiheadAttention and
unbatched (2-D) calls go to the generic rule.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .base import Grads, LayerRule, Part, dots_of_grads, gram_of_grads, self_gram_of_grads, sums_of_grads
from .factored import factored_dots, factored_gram, factored_self_gram, factored_sums
from .linear import LinearRule
from .registry import register_rule

#: the rule of the Linear layers a tapped call splits into (see MultiheadAttentionRule.parts)
_LINEAR = LinearRule()

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class AttentionCall:
    """One call, batch first: ``query [B, L, E]``, ``key [B, S, kdim]``, ``value [B, S, vdim]``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    need_weights: bool
    average_attn_weights: bool
    is_causal: bool
    #: which of query, key, value are the same tensor: one token group per distinct tensor
    same_key_value: bool
    same_query_key: bool
    #: from the call's autograd graph (packed self-attention): ``{"in_proj" | "out_proj":
    #: (inputs [B, L, E], output gradients [d, B, L, out])}``; None: recompute
    tapped: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None


def _bind(args, kwargs) -> Dict:
    bound = _SIGNATURE.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _canonical(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """As torch does: a bool mask becomes an additive float mask (-inf where True)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


@dataclass
class _Internals:
    xq: torch.Tensor  # [B, L, E]
    xk: torch.Tensor  # [B, S, kdim]
    xv: torch.Tensor  # [B, S, vdim]
    q: torch.Tensor  # [B, H, L, hd]
    k: torch.Tensor  # [B, H, S', hd] (with bias_k and the zero column)
    v: torch.Tensor
    attn: torch.Tensor  # softmax, [B, H, L, S']
    context: torch.Tensor  # [B, L, E], out_proj's input


def _projection_weights(module: nn.MultiheadAttention):
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight
        wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b = module.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
    return (wq, wk, wv), (bq, bk, bv)


def _forward(module: nn.MultiheadAttention, call: AttentionCall, dtype: torch.dtype) -> _Internals:
    """The maths of F.multi_head_attention_forward (dropout off), batch first."""
    h, e = module.num_heads, module.embed_dim
    hd = e // h
    xq = call.query.to(dtype)
    xk = xq if call.same_query_key else call.key.to(dtype)
    xv = xk if call.same_key_value else call.value.to(dtype)
    b, length, _ = xq.shape
    (wq, wk, wv), (bq, bk, bv) = _projection_weights(module)
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    if module._qkv_same_embed_dim and call.same_query_key and call.same_key_value:
        # self-attention: one matmul for the three projections, as torch does
        q, k, v = F.linear(xq, cast(module.in_proj_weight), cast(module.in_proj_bias)).chunk(3, -1)
    else:
        q = F.linear(xq, cast(wq), cast(bq))
        k = F.linear(xk, cast(wk), cast(bk))
        v = F.linear(xv, cast(wv), cast(bv))
    extra = 0  # key columns added after the source tokens (bias_k, the zero column)
    if module.bias_k is not None:
        k = torch.cat([k, cast(module.bias_k).reshape(1, 1, e).expand(b, 1, e)], 1)
        v = torch.cat([v, cast(module.bias_v).reshape(1, 1, e).expand(b, 1, e)], 1)
        extra += 1
    heads = lambda t: t.reshape(b, t.shape[1], h, hd).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if module.add_zero_attn:
        zeros = torch.zeros(b, h, 1, hd, dtype=dtype, device=k.device)
        k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
        extra += 1
    scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)  # [B, H, L, S']
    mask = _mask(call, b, h, length, k.shape[2], extra, dtype, scores.device)
    if mask is not None:
        scores = scores + mask
    attn = torch.softmax(scores, dim=-1)
    context = (attn @ v).transpose(1, 2).reshape(b, length, e)
    return _Internals(xq, xk, xv, q, k, v, attn, context)


def _mask(call: AttentionCall, b, h, length, src, extra, dtype, device) -> Optional[torch.Tensor]:
    """The additive mask ``[B or 1, H or 1, L, S']`` torch builds from the call's masks."""
    if call.is_causal and call.key_padding_mask is None and not call.need_weights:
        # torch then drops attn_mask and lets the kernel apply a causal mask itself
        causal = torch.ones(length, src - extra, dtype=torch.bool, device=device).triu(1)
        attn_mask = _canonical(causal, dtype)
    else:
        attn_mask = _canonical(call.attn_mask, dtype)
    total = None
    if attn_mask is not None:
        attn_mask = attn_mask.reshape(1, 1, *attn_mask.shape) if attn_mask.dim() == 2 else attn_mask.reshape(
            b, h, *attn_mask.shape[1:]
        )
        total = F.pad(attn_mask, (0, extra))
    padding = _canonical(call.key_padding_mask, dtype)
    if padding is not None:
        padding = F.pad(padding.reshape(b, 1, 1, -1), (0, extra))
        total = padding if total is None else total + padding
    return total


@dataclass
class _Deltas:
    q: torch.Tensor  # [d, B, L, E], gradient at the q projection's output
    k: torch.Tensor  # [d, B, S, E]
    v: torch.Tensor
    bias_k: Optional[torch.Tensor]  # [d, B, E]
    bias_v: Optional[torch.Tensor]
    out: torch.Tensor  # [d, B, L, E], at out_proj's output


def _backward(module, inner: _Internals, g_out: torch.Tensor, g_weights: Optional[torch.Tensor],
              average: bool) -> _Deltas:
    """Closed-form backward of the recomputation, for all d outputs at once."""
    d, b, length, e = g_out.shape
    h = module.num_heads
    hd = e // h
    src = inner.xk.shape[1]
    scale = 1.0 / math.sqrt(hd)
    g_context = g_out @ module.out_proj.weight.detach().to(g_out.dtype)  # [d, B, L, E]
    g_context = g_context.reshape(d, b, length, h, hd).transpose(2, 3)  # [d, B, H, L, hd]
    attn = inner.attn
    g_attn = g_context @ inner.v.transpose(-2, -1)  # [d, B, H, L, S']
    if g_weights is not None:
        g_attn = g_attn + (g_weights.unsqueeze(2) / h if average else g_weights)
    g_v = attn.transpose(-2, -1) @ g_context  # [d, B, H, S', hd]
    g_scores = attn * (g_attn - (g_attn * attn).sum(-1, keepdim=True))
    g_q = (g_scores @ inner.k) * scale
    g_k = (g_scores.transpose(-2, -1) @ inner.q) * scale
    merge = lambda t: t.transpose(2, 3).reshape(d, b, t.shape[3], e)  # noqa: E731
    g_q, g_k, g_v = merge(g_q), merge(g_k), merge(g_v)
    bias_k = bias_v = None
    if module.bias_k is not None:
        bias_k, bias_v = g_k[:, :, src], g_v[:, :, src]
    return _Deltas(g_q, g_k[:, :, :src], g_v[:, :, :src], bias_k, bias_v, g_out)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    name = "attention"
    multi_output = True

    def child_parameters(self, module: nn.Module) -> List[str]:
        return [f"out_proj.{n}" for n, _ in module.out_proj.named_parameters(recurse=False)]

    def check(self, module: nn.Module, module_name: str) -> None:
        if module.training and module.dropout > 0:
            raise ModelError(
                f"nn.MultiheadAttention '{module_name}' has dropout={module.dropout} and is in training mode: its "
                "random attention masks cannot be replayed per sample. Call model.eval() (or set dropout=0)."
            )

    def batched(self, module, args, kwargs, outputs, batch) -> Optional[bool]:
        try:
            a = _bind(args, kwargs)
        except TypeError:
            return False
        dim = 0 if module.batch_first else 1
        tensors = (a["query"], a["key"], a["value"])
        if not all(torch.is_tensor(t) and t.dim() == 3 and t.shape[dim] == batch for t in tensors):
            return False  # unbatched (2-D) inputs, or the batch elsewhere: the generic rule
        if any(t.is_nested for t in tensors):
            return False
        return outputs[0].dim() == 3 and outputs[0].shape[dim] == batch and all(
            o.shape[0] == batch for o in outputs[1:]
        )

    def tap_graph(self, call):
        """The in-projection and ``out_proj`` matrix products of a packed self-attention call,
        found in the autograd graph between its output and its input: ``({key: saved input
        [L*B, E]}, {key: node})``, or None (then :meth:`operands` recomputes)."""
        module = call.module
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        weights = {"in_proj": module.in_proj_weight, "out_proj": module.out_proj.weight}
        if not all(w.requires_grad for w in weights.values()):
            return None
        try:
            a = _bind(call.args, call.kwargs)
        except TypeError:
            return None
        query = a["query"]
        if not (query is a["key"] is a["value"]) or query.dim() != 3:
            return None
        found = _find_products(call.out_leaves, query, weights)
        if found is None:
            return None
        length, batch = (query.shape[1], query.shape[0]) if module.batch_first else query.shape[:2]
        saved, nodes = found
        e = module.embed_dim
        if any(x.shape != (length * batch, e) for x in saved.values()):
            return None
        # rows are (token, sample) with the token outer, as F.multi_head_attention_forward lays them out
        first = query[0, :2] if not module.batch_first else query[:2, 0]
        if not torch.equal(saved["in_proj"][: min(2, batch)], first[: min(2, batch)].to(saved["in_proj"].dtype)):
            return None
        return {k: x.view(length, batch, e).transpose(0, 1) for k, x in saved.items()}, nodes

    def operands(self, call, d: int) -> Tuple[AttentionCall, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        module = call.module
        a = _bind(call.args, call.kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        same_kv, same_qk = key is value, query is key
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        inputs = AttentionCall(
            query, key, value, a["key_padding_mask"], a["attn_mask"], bool(a["need_weights"]),
            bool(a["average_attn_weights"]), bool(a["is_causal"]), same_kv, same_qk,
        )
        grads: List[Optional[torch.Tensor]] = []
        for i, leaf in enumerate(call.out_leaves):
            rows = [call.grads[j][i] if j < len(call.grads) else None for j in range(d)]
            if all(g is None for g in rows):
                grads.append(None)
                continue
            rows = [torch.zeros_like(leaf) if g is None else g for g in rows]
            grads.append(rows[0].unsqueeze(0) if d == 1 else torch.stack(rows))  # no copy for one output
        by_position = dict(zip(call.out_positions, grads))
        g_out, g_weights = by_position.get(0), by_position.get(1)
        if g_out is None:  # only the weights reached the differentiated output
            g_out = torch.zeros(d, *query.shape[:2], module.embed_dim, dtype=g_weights.dtype, device=g_weights.device)
        elif not module.batch_first:
            g_out = g_out.transpose(1, 2)  # [d, L, B, E] -> [d, B, L, E]
        if call.tapped is not None:
            inputs.tapped = _tapped(call, d, g_out.dtype)
        return inputs, (g_out, g_weights)

    # -- the factors -----------------------------------------------------------------

    def _factors(self, module, inputs: AttentionCall, backprops):
        """``matrices``: name -> (cols ``[B, c, T]``, rows ``[d, B, r, T]``) with ``grad =
        sum_t rows_t cols_t^T``; ``vectors``: name -> per-sample gradient ``[B, d, *shape]``."""
        if inputs.tapped is not None:
            return _tapped_factors(module, inputs.tapped)
        g_out, g_weights = backprops
        dtype = g_out.dtype
        with torch.no_grad():
            inner = _forward(module, inputs, dtype)
            deltas = _backward(module, inner, g_out, g_weights, inputs.average_attn_weights)
        matrices: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        vectors: Grads = {}
        t = lambda x: x.transpose(-2, -1)  # noqa: E731
        if module._qkv_same_embed_dim:
            if module.in_proj_weight.requires_grad:
                matrices["in_proj_weight"] = self._packed(inner, deltas, inputs)
        else:
            for name, x, delta in (("q_proj_weight", inner.xq, deltas.q), ("k_proj_weight", inner.xk, deltas.k),
                                   ("v_proj_weight", inner.xv, deltas.v)):
                if getattr(module, name).requires_grad:
                    matrices[name] = (t(x), t(delta))
        if module.in_proj_bias is not None and module.in_proj_bias.requires_grad:
            sums = [delta.sum(2) for delta in (deltas.q, deltas.k, deltas.v)]
            vectors["in_proj_bias"] = torch.cat(sums, -1).transpose(0, 1)
        for name, delta in (("bias_k", deltas.bias_k), ("bias_v", deltas.bias_v)):
            param = getattr(module, name)
            if param is not None and param.requires_grad:
                vectors[name] = delta.transpose(0, 1).reshape(delta.shape[1], delta.shape[0], *param.shape)
        if module.out_proj.weight.requires_grad:
            matrices["out_proj.weight"] = (t(inner.context), t(deltas.out))
        if module.out_proj.bias is not None and module.out_proj.bias.requires_grad:
            vectors["out_proj.bias"] = deltas.out.sum(2).transpose(0, 1)
        return matrices, vectors

    @staticmethod
    def _packed(inner: _Internals, deltas: _Deltas, inputs: AttentionCall):
        """Factors of ``in_proj_weight = [W_q; W_k; W_v]``: one token group per distinct
        input tensor, whose rows hold the deltas of the roles that read it (zeros elsewhere)."""
        groups: List[Tuple[torch.Tensor, List[Optional[torch.Tensor]]]] = []
        if inputs.same_query_key and inputs.same_key_value:
            groups.append((inner.xq, [deltas.q, deltas.k, deltas.v]))
        elif inputs.same_key_value:
            groups += [(inner.xq, [deltas.q, None, None]), (inner.xk, [None, deltas.k, deltas.v])]
        else:
            groups += [(inner.xq, [deltas.q, None, None]), (inner.xk, [None, deltas.k, None]),
                       (inner.xv, [None, None, deltas.v])]
        cols, rows = [], []
        for x, roles in groups:
            ref = next(r for r in roles if r is not None)
            zeros = torch.zeros_like(ref)
            cols.append(x.transpose(1, 2))
            rows.append(torch.cat([zeros if r is None else r for r in roles], -1).transpose(2, 3))
        return torch.cat(cols, -1), torch.cat(rows, -1)

    def parts(self, module, inputs: AttentionCall, backprops) -> Optional[List[Part]]:
        """For a tapped call, its two weights as Linear layers (``view.weight`` / ``view.bias``
        the module's parameters, for :class:`~nnsim_hooks.rules.linear.LinearRule`) with their
        inputs ``[B, L, in]`` and output gradients ``[d, B, L, out]``; None otherwise."""
        if inputs.tapped is None:
            return None
        parts = []
        for key, weight, bias in (("in_proj", module.in_proj_weight, module.in_proj_bias),
                                  ("out_proj", module.out_proj.weight, module.out_proj.bias)):
            x, delta = inputs.tapped[key]
            bias = bias if bias is not None and bias.requires_grad else None
            parts.append(Part(key, _LINEAR, LinearView(weight, bias), x, delta))
        return parts

    # -- weighted sums and products (the exact dataset-scale queries) ----------------------

    def sums(self, module, inputs, backprops, weights) -> Grads:
        """Factored, with no per-sample gradient of the weights (see :meth:`LayerRule.sums`)."""
        matrices, vectors = self._factors(module, inputs, backprops)
        out = sums_of_grads(vectors, weights)
        for name, (cols, rows) in matrices.items():
            out[name] = factored_sums(cols, rows, weights)
        return _in_order(module, out)

    def dots(self, module, inputs, backprops, sums: Grads) -> Optional[torch.Tensor]:
        matrices, vectors = self._factors(module, inputs, backprops)
        total = dots_of_grads(vectors, sums)
        for name, (cols, rows) in matrices.items():
            if name in sums:
                part = factored_dots(cols, rows, sums[name])
                total = part if total is None else total + part
        return total

    # -- the three things a rule provides ------------------------------------------------

    def grad_sample(self, module, activation, backprops) -> Grads:
        matrices, vectors = self._factors(module, activation, backprops)
        out: Grads = dict(vectors)
        for name, (cols, rows) in matrices.items():
            out[name] = torch.einsum("jbrt,bct->bjrc", rows, cols.to(rows.dtype))
        return _in_order(module, out)

    def gram(self, module, activation, backprops) -> torch.Tensor:
        matrices, vectors = self._factors(module, activation, backprops)
        d, b = backprops[0].shape[:2]
        total = torch.zeros(b * d, b * d, dtype=torch.float64, device=backprops[0].device)
        for cols, rows in matrices.values():
            total += factored_gram(cols, rows, weight=True, bias=False)
        if vectors:
            total += gram_of_grads(vectors)
        return total

    def self_gram(self, module, activation, backprops) -> torch.Tensor:
        matrices, vectors = self._factors(module, activation, backprops)
        d, b = backprops[0].shape[:2]
        total = torch.zeros(b, d, d, dtype=torch.float64, device=backprops[0].device)
        for cols, rows in matrices.values():
            total += factored_self_gram(cols, rows, weight=True, bias=False)
        if vectors:
            total += self_gram_of_grads(vectors)
        return total

    def sketch(self, module, activation, backprops, sketches) -> Grads:
        matrices, vectors = self._factors(module, activation, backprops)
        out: Grads = {name: sketches[name].project_gradients(g) for name, g in vectors.items()}
        for name, (cols, rows) in matrices.items():
            s = sketches[name]
            out[name] = s.combine_factors(s.rows_of(rows, 2), s.cols_of(cols, 1).unsqueeze(0))
        return out


@dataclass
class LinearView:
    """One of the call's weights seen as an ``nn.Linear`` (what LinearRule reads). Not a
    module: nothing is added to the model."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _find_products(leaves, query: torch.Tensor, weights: Dict[str, torch.Tensor]):
    """Walk the call's graph from its outputs back to ``query``'s node: for each weight, the
    one matrix-product node that multiplies by its transpose, and that node's saved input."""
    stop = query.grad_fn
    seen, todo = set(), [t.grad_fn for t in leaves if t.grad_fn is not None]
    saved: Dict[str, torch.Tensor] = {}
    nodes: Dict[str, object] = {}
    while todo:
        node = todo.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_NODES:
            return None
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt).__name__ == "TBackward0":
                acc = nxt.next_functions[0][0]
                for key, w in weights.items():
                    if getattr(acc, "variable", None) is w:
                        if key in nodes:
                            return None  # used twice: not the layout this path assumes
                        x = _saved_input(node)
                        if x is None:
                            return None
                        saved[key], nodes[key] = x, node
            todo.append(nxt)
    return (saved, nodes) if len(nodes) == len(weights) else None


#: a call's graph between its output and its input is a few dozen nodes; past this, give up
_MAX_NODES = 512


def _saved_input(node) -> Optional[torch.Tensor]:
    """The left operand of ``mm(x, W.t())`` / ``addmm(b, x, W.t())``."""
    name = type(node).__name__
    try:
        if name == "MmBackward0":
            return node._saved_self
        if name == "AddmmBackward0":
            return node._saved_mat1
    except RuntimeError:  # pragma: no cover - saved tensors already freed
        return None
    return None


def _tapped(call, d: int, dtype: torch.dtype) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The tapped products as ``(inputs [B, L, E], output gradients [d, B, L, out])``."""
    out = {}
    for key, x in call.tapped.items():
        slots = call.taps.get(key, [])
        rows = [slots[j] if j < len(slots) else None for j in range(d)]
        b, length = x.shape[:2]
        width = 3 * x.shape[2] if key == "in_proj" else x.shape[2]
        grads = [
            torch.zeros(b, length, width, dtype=dtype, device=x.device) if g is None
            else g.view(length, b, width).transpose(0, 1)
            for g in rows
        ]
        out[key] = (x.to(dtype), grads[0].unsqueeze(0) if d == 1 else torch.stack(grads))
    return out


def _tapped_factors(module, tapped):
    matrices: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    vectors: Grads = {}
    for key, weight, bias in (("in_proj", "in_proj_weight", "in_proj_bias"),
                              ("out_proj", "out_proj.weight", "out_proj.bias")):
        x, delta = tapped[key]  # [B, L, in], [d, B, L, out]
        matrices[weight] = (x.transpose(1, 2), delta.transpose(2, 3))
        param = module.in_proj_bias if key == "in_proj" else module.out_proj.bias
        if param is not None and param.requires_grad:
            vectors[bias] = delta.sum(2).transpose(0, 1)
    return matrices, vectors


def _in_order(module: nn.Module, grads: Grads) -> Grads:
    order = [n for n, _ in module.named_parameters()]
    return {n: grads[n] for n in order if n in grads}
