"""Parameters used outside their own module's forward, shared across samples, or
directly by a module on the generic rule: all must still give exact per-sample gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nnsim_hooks
from nnsim_hooks.oracle import per_sample_loop


def assert_matches_loop(model, x, output="sum", rtol=1e-5, passes=2):
    """Every pass (the first checks the per-op split, later ones use it) matches the loop."""
    with nnsim_hooks.attach(model, output=output) as h:
        for _ in range(passes):
            got = h.per_sample_gradients(x)
            ref = per_sample_loop(model, x, output=output, names=set(h.parameter_names))
            assert set(got) == set(ref)
            for name, r in ref.items():
                torch.testing.assert_close(got[name], r, rtol=rtol, atol=rtol * r.abs().max().item() + 1e-12, msg=name)
        return h.coverage, dict(h.engine.fallback_methods)


def test_multihead_attention_out_proj_is_not_missed():
    """A subclass of nn.MultiheadAttention is on the generic rule (the attention rule
    matches the exact type); it reads out_proj.weight itself."""
    torch.manual_seed(0)

    class MyAttention(nn.MultiheadAttention):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MyAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    coverage, _ = assert_matches_loop(Net().eval(), torch.randn(4, 5, 8), output="contrast")
    row = next(r for r in coverage.rows if r.module == "attn")
    assert "out_proj.weight" in row.note and row.status == "fallback"


def test_tied_table_used_by_the_parent():
    torch.manual_seed(0)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.mix = nn.Linear(6, 6)

        def forward(self, ids):
            h = torch.tanh(self.mix(self.embed(ids)))
            return F.linear(h, self.embed.weight)[:, -1]  # logits over the vocabulary

    assert_matches_loop(TiedLM().eval(), torch.randint(0, 11, (4, 5)), output="logit")


def test_module_run_on_a_shared_table_is_handled_by_its_user():
    """A relative-position MLP runs on coordinates, not on the batch; its output bias is
    added to every sample. Its per-sample gradient exists only through that addition."""
    torch.manual_seed(0)

    class RelBias(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("coords", torch.linspace(-1, 1, n).unsqueeze(1))
            self.mlp = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return x + self.mlp(self.coords).squeeze(1)

    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.inp = nn.Linear(3, n)
            self.bias = RelBias(n)
            self.out = nn.Linear(n, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.bias(self.inp(x))))

    # n == batch size: the table's first dimension looks like a batch, and must not fool us.
    model = Net(4).double().eval()
    coverage, _ = assert_matches_loop(model, torch.randn(4, 3, dtype=torch.float64), output="full")
    assert next(r for r in coverage.rows if r.module == "bias").status == "fallback"


class TokenNet(nn.Module):
    """cls token and position embedding held by the model itself, as in a ViT."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 4, 6))
        self.gamma = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.embed(x)  # [B, 3, 6]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(torch.tanh(tokens * self.gamma)[:, 0])


def test_direct_uses_replace_the_full_rerun_once_checked():
    torch.manual_seed(0)
    _, methods = assert_matches_loop(TokenNet().eval(), torch.randn(5, 3, 4), output="full", passes=3)
    assert methods[""] == "direct uses"


def test_a_split_that_does_not_hold_is_rejected():
    """A table whose first dimension equals the batch size, indexed without the batch:
    splitting per op by shape would be wrong; the check against the full re-run refuses it."""
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(3, 5))
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # x: [3, 5]; the table is added to every sample, whole
            shared = self.table * 2.0  # [3, 5]: first dimension 3 == batch, not the batch
            return self.head(torch.tanh(x + shared.sum(0)))

    _, methods = assert_matches_loop(Shared().eval(), torch.randn(3, 5), output="sum", passes=3)
    assert methods[""] in ("vmap", "loop")


def test_parameter_reached_through_a_closure_is_refused():
    torch.manual_seed(0)
    outside = nn.Linear(4, 4)

    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(self.body(x), outside.weight).sum(1)

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.sneaky = Sneaky()
            self.other = outside  # the model holds it, but Sneaky uses it without holding it

        def forward(self, x):
            return self.sneaky(x)

    with nnsim_hooks.attach(Both().eval()) as h:
        with pytest.raises(nnsim_hooks.ModelError, match="other.weight.*sneaky"):
            h.per_sample_gradients(torch.randn(2, 4))


def test_sequence_first_layers_are_caught_when_length_equals_batch():
    """[T, B, C] inside the model with T == B: shapes cannot tell; the rolled-batch check can."""
    torch.manual_seed(0)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x: [B, T, C]
            return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))

    model = SeqFirst().double().eval()
    assert_matches_loop(model, torch.randn(3, 3, 4, dtype=torch.float64), output="full")


def test_a_parameter_free_layer_mixing_samples_is_refused():
    class BatchCentred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)  # no parameter here, but the samples mix

    with nnsim_hooks.attach(BatchCentred().eval(), output="sum") as h:
        with pytest.raises(nnsim_hooks.BatchCouplingError, match="mixes the samples"):
            h.per_sample_gradients(torch.randn(4, 4))


def test_output_computed_from_another_output_of_the_same_module():
    """(y, h) with y computed from h inside the module (timm's EfficientViM HSMSSD): the
    gradient arriving at h from outside must not include the part that flows through y."""
    torch.manual_seed(0)

    class StateMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.state = nn.Linear(6, 6)
            self.gate = nn.Parameter(torch.randn(6))

        def forward(self, x):
            h = self.state(x) * self.gate
            y = torch.tanh(h) * self.gate
            return y, h

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = StateMixer()
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            y, h = self.mixer(x)
            return self.head(y + 0.5 * h)

    assert_matches_loop(Net().eval(), torch.randn(4, 6), output="contrast")


def test_list_argument_that_grows_after_the_call():
    """DenseNet-style blocks get the list of earlier features, which is then appended to:
    the generic rule must rerun the block on the list as it was at the call."""
    torch.manual_seed(0)

    class Concat(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(c))

        def forward(self, feats):
            return torch.stack(feats, 0).sum(0) * self.scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Concat(4), Concat(4)])
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            feats = [self.stem(x)]
            for block in self.blocks:
                feats.append(torch.tanh(block(feats)))
            return self.head(torch.cat(feats, 1))

    assert_matches_loop(Net().eval(), torch.randn(5, 4), output="contrast")


class _InvisibleMixer(nn.Module):
    """Attention across the batch on a per-sample constant (csatv2's pattern): the forward
    values do not depend on the other samples, the gradients do."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(1)
        self.qk = nn.Linear(1, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        t = self.norm(x.unsqueeze(-1)).mean(1)  # [B, 1], the norm's bias for every sample
        q, k = self.qk(t).unbind(-1)  # [B] each
        attn = (q[:, None] * k[None, :]).softmax(-1)  # [B, B]: across the batch
        mixed = attn @ k  # constant across samples, like the inputs
        return self.head(x) + mixed[:, None] * torch.tensor([1.0, -1.0, 0.5])  # moves the classes apart


def test_samples_mixed_only_in_the_backward_are_warned_about():
    torch.manual_seed(0)
    model = _InvisibleMixer().eval()
    x = torch.randn(4, 4)
    with torch.no_grad():  # the forward values are per sample
        torch.testing.assert_close(model(x), torch.cat([model(x[:2]), model(x[2:])]))
    with nnsim_hooks.attach(model) as h:
        with pytest.warns(RuntimeWarning, match="module 'norm'.*check_per_sample_gradients"):
            got = h.per_sample_gradients(x)
    # The warning is right: the hooked numbers are not the per-sample ones.
    with pytest.raises(AssertionError, match="disagree"):
        nnsim_hooks.oracle.check_per_sample_gradients(model, x)
    assert set(got)


def test_a_model_that_mixes_samples_is_refused_on_every_call():
    class BatchCentre(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x - x.mean(0))

    with nnsim_hooks.attach(BatchCentre().eval()) as h:
        for _ in range(2):
            with pytest.raises(nnsim_hooks.errors.BatchCouplingError):
                h.features(torch.randn(4, 3))


def test_batch_comparison_tolerances_follow_precision_and_device():
    from nnsim_hooks.capture.batch_mixing import tolerances

    assert tolerances(nn.Linear(2, 2)) == (1e-4, 1e-6)  # float32 on CPU
    rtol16, _ = tolerances(nn.Linear(2, 2).half())
    assert 0.05 < rtol16 < 0.2  # float16 rounds ~1e-3 per op
    rtol64, _ = tolerances(nn.Linear(2, 2).double())
    assert rtol64 == 1e-4


def test_layout_check_runs_the_kernels_of_the_captured_pass():
    """nn.MultiheadAttention takes a fused fast path when gradients are off; its rounding
    differs. The halves must run as the captured pass does, or that reads as mixing."""

    class FastPathWhenNoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return y if torch.is_grad_enabled() else y * 1.01  # another kernel, other rounding

    with nnsim_hooks.attach(FastPathWhenNoGrad().eval()) as h:
        assert h.features(torch.randn(4, 3)).shape == (4, 1024)
