"""Every "Bad input" of issue 2 ends in a clear exception from ``nnsim_hooks.errors`` (or the
documented NaN + warning), and the message carries what is needed to fix it: the module
path, the expected shape, the call to make."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.errors import (
    AttachError,
    BatchCouplingError,
    InputError,
    ModelError,
    NnsimError,
    NonFiniteGradientError,
    OutputSpecError,
)


def cnn(classes=3):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, classes),
    ).eval()


X = lambda b=3: torch.randn(b, 3, 8, 8)  # noqa: E731


# -- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, expected", [
    (lambda: torch.randn(3, 5, 8, 8), r"\[B, 3, H, W\].*'0' \(Conv2d\)"),  # wrong channels
    (lambda: torch.randn(3, 8, 8), r"\[B, 3, H, W\]"),  # missing a dimension
    (lambda: torch.randn(3, 3, 8, 8, dtype=torch.float64), r"float64.*float32.*\[B, 3, H, W\]"),
    (lambda: torch.randint(0, 5, (3, 3, 8, 8)), r"\[B, 3, H, W\]"),  # integer images
    (lambda: torch.randn(3, 3, 8, 8, device="meta"), r"meta.*cpu.*\[B, 3, H, W\]"),  # another device
    (lambda: torch.tensor(1.0), r"batched tensor \[B, \.\.\.\]"),
    (lambda: "an image", r"batched tensor"),
    (lambda: (torch.randn(3, 3, 8, 8), torch.randn(2, 3)), r"batch size 3"),
])
def test_bad_inputs_name_the_expected_shape(bad, expected):
    with nnsim_hooks.attach(cnn()) as h:
        with pytest.raises(InputError, match=expected):
            h.per_sample_gradients(bad())
        with pytest.raises(InputError):
            h.similarity(bad())


def test_mixed_kinds_of_a_and_b():
    with nnsim_hooks.attach(cnn()) as h:
        with pytest.raises(InputError, match="same kind"):
            h.similarity(X(), X(2), targets_a=torch.tensor([0, 1, 2]))  # targets for a only


@pytest.mark.parametrize("targets, output, expected", [
    (torch.tensor([0, 1]), "contrast", r"one entry per sample \(3\)"),
    (torch.tensor([0, 1, 7]), "loss", r"\[0, 3\).*\[7\]"),
    (torch.tensor([0.0, 1.0, 2.0]), "contrast", r"integer class targets"),
    (None, "loss", r"needs targets"),
])
def test_bad_targets(targets, output, expected):
    with nnsim_hooks.attach(cnn(), output=output) as h:
        with pytest.raises(InputError, match=expected):
            h.per_sample_gradients(X(), targets)


# -- output functions -------------------------------------------------------------------------


@pytest.mark.parametrize("fn, expected", [
    (lambda out, t: out.unsqueeze(2), r"shape \(3, 3, 1\).*\[3\].*\[3, d\]"),
    (lambda out, t: out.sum(), r"shape \(\).*\[3\]"),
    (lambda out, t: out[:2, 0], r"shape \(2,\)"),
    (lambda out, t: out.argmax(1), r"int64.*floating point"),
    (lambda out, t: out.tolist(), r"returned list"),
    (lambda out, t: out[:, 0] - out[:, 0].mean(), r"mixes samples"),
    (lambda out, t: torch.softmax(out[:, 0], dim=0), r"mixes samples"),
])
def test_bad_output_functions(fn, expected):
    with nnsim_hooks.attach(cnn(), output=fn) as h:
        with pytest.raises(OutputSpecError, match=expected):
            h.per_sample_gradients(X())


@pytest.mark.parametrize("output", ["contrast", "logit", "loss"])
def test_classifier_outputs_on_a_dense_model(output):
    dense = nn.Conv2d(3, 2, 3).eval()
    with nnsim_hooks.attach(dense, output=output) as h:
        with pytest.raises(OutputSpecError, match=r"\[B, C\].*\(3, 2, 6, 6\).*'sum' or 'full'"):
            h.per_sample_gradients(X(), torch.tensor([0, 1, 0]))


def test_unknown_output_name():
    with pytest.raises(OutputSpecError, match="'bogus'.*contrast"):
        nnsim_hooks.attach(cnn(), output="bogus")
    # the failed attach left nothing behind
    nnsim_hooks.attach(cnn()).detach()


def test_failed_attach_does_not_leave_the_model_attached():
    model = cnn()
    with pytest.raises(OutputSpecError):
        nnsim_hooks.attach(model, output="bogus")
    nnsim_hooks.attach(model).detach()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- gradients ----------------------------------------------------------------------------------


class SqrtNet(nn.Module):
    """sqrt(|u|) has an infinite slope at u = 0: with 'inner' zeroed, the gradient of 'inner'
    is NaN (Inf * sign(0)) while the outputs stay finite."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.outer = nn.Linear(4, 2)

    def forward(self, x):
        return self.outer(torch.sqrt(torch.abs(self.inner(x))))


def test_non_finite_gradient_names_the_module():
    model = SqrtNet().eval()
    with torch.no_grad():
        model.inner.weight.zero_()
        model.inner.bias.zero_()
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.raises(NonFiniteGradientError, match=r"'inner' \(Linear\).*samples \[0, 1\]"):
            h.per_sample_gradients(torch.randn(2, 4))
        with pytest.raises(NonFiniteGradientError, match=r"'inner'"):
            h.similarity(torch.randn(2, 4))


def test_non_finite_outputs_name_the_samples():
    with nnsim_hooks.attach(nn.Linear(4, 2).eval(), output="sum") as h:
        x = torch.randn(3, 4)
        x[1, 2] = float("nan")
        with pytest.raises(NonFiniteGradientError, match=r"samples \[1\]"):
            h.per_sample_gradients(x)


def test_zero_gradient_sample_gives_nan_similarity_and_a_warning():
    model = nn.Linear(4, 3, bias=False).eval()  # gradient x: zero for x = 0
    x = torch.randn(4, 4)
    x[2] = 0
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.warns(RuntimeWarning, match=r"\[2\].*NaN"):
            sim = h.similarity(x)
        with pytest.warns(RuntimeWarning, match=r"\[0\]"):
            cross = h.similarity(x[2:3], x[:2])
        with pytest.warns(RuntimeWarning, match=r"\[2\]"):
            feats = h.features(x)
    assert torch.isnan(sim[2]).all() and torch.isnan(sim[:, 2]).all()
    keep = [0, 1, 3]
    assert torch.isfinite(sim[keep][:, keep]).all()
    assert torch.isnan(cross).all()
    assert torch.isnan(feats[2]).all() and torch.isfinite(feats[keep]).all()


def test_no_warning_without_zero_gradients():
    with nnsim_hooks.attach(nn.Linear(4, 3).eval(), output="sum") as h:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            h.similarity(torch.randn(3, 4))


# -- model state ----------------------------------------------------------------------------------


def test_attaching_twice():
    model = cnn()
    with nnsim_hooks.attach(model):
        with pytest.raises(AttachError, match=r"already attached.*detach"):
            nnsim_hooks.attach(model)
    nnsim_hooks.attach(model).detach()  # fine once the first is gone


def test_attach_needs_a_module():
    with pytest.raises(AttachError, match="nn.Module.*function"):
        nnsim_hooks.attach(lambda x: x)


def test_batchnorm_in_train_mode_names_the_module_and_says_eval():
    model = cnn().train()
    with nnsim_hooks.attach(model) as h:
        with pytest.raises(BatchCouplingError, match=r"'1' \(BatchNorm2d\).*training mode.*model\.eval\(\)"):
            h.per_sample_gradients(X())
        model.eval()
        h.per_sample_gradients(X())  # fine after eval()


def test_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.raises(BatchCouplingError, match=r"'1'.*track_running_stats=False.*GroupNorm"):
            h.per_sample_gradients(torch.randn(3, 4))


class BatchCentering(nn.Module):
    """A user module that mixes the samples: it subtracts the batch mean."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.gamma


def test_user_module_mixing_samples_names_the_module():
    model = nn.Sequential(nn.Linear(4, 4), BatchCentering(), nn.Linear(4, 2)).eval()
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.raises(BatchCouplingError, match=r"'1' \(BatchCentering\).*mixes the samples"):
            h.per_sample_gradients(torch.randn(3, 4))
        with pytest.raises(BatchCouplingError, match=r"'1'"):
            h.similarity(torch.randn(3, 4))


def test_active_dropout_inside_a_fallback_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x) * self.gamma

    model = nn.Sequential(nn.Linear(4, 4), Block()).train()
    with nnsim_hooks.attach(model, output="sum") as h:
        with pytest.raises(ModelError, match=r"dropout '1.drop'.*model\.eval\(\)"):
            h.per_sample_gradients(torch.randn(3, 4))


def test_no_trainable_parameters():
    model = cnn().requires_grad_(False)
    with pytest.raises(ModelError, match=r"no trainable parameters.*requires_grad_\(True\)"):
        nnsim_hooks.attach(model)
    nnsim_hooks.attach(cnn()).detach()


@pytest.mark.parametrize("layers", ["nope", ["conv*"], lambda name, module: False])
def test_layers_selecting_nothing(layers):
    with pytest.raises(ModelError, match=r"selects no module.*\['0', '1', '5'\]"):
        nnsim_hooks.attach(cnn(), layers=layers)


def test_layers_selecting_only_frozen_modules():
    model = cnn()
    model[5].requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        nnsim_hooks.attach(model, layers=["5"])


def test_selected_modules_that_do_not_run():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.spare = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    with nnsim_hooks.attach(Unused(), output="sum", layers="spare") as h:
        with pytest.raises(ModelError, match="none of the selected modules ran"):
            h.per_sample_gradients(torch.randn(2, 4))


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size(batch_size):
    with pytest.raises(InputError, match="batch_size"):
        nnsim_hooks.attach(cnn(), batch_size=batch_size)


# -- attach's arguments fail at attach, naming the argument, the value and what is accepted ----------


@pytest.mark.parametrize("kwargs, expected", [
    (dict(sketch_dim=0), r"attach\(sketch_dim=0\).*int >= 1"),
    (dict(sketch_dim=-5), r"attach\(sketch_dim=-5\).*int >= 1"),
    (dict(sketch_dim=64.0), r"attach\(sketch_dim=64\.0\).*int >= 1"),
    (dict(sketch_dim=True), r"attach\(sketch_dim=True\).*int >= 1"),
    (dict(seed=1.5), r"attach\(seed=1\.5\).*must be an int"),
    (dict(seed="0"), r"attach\(seed='0'\).*must be an int"),
    (dict(seed=None), r"attach\(seed=None\).*must be an int"),
    (dict(sketch_dim=256, stage1_dim=128), r"attach\(stage1_dim=128\).*at least sketch_dim = 256.*int >= 256"),
    (dict(stage1_dim=0), r"attach\(stage1_dim=0\).*int >= 1024"),
    (dict(exact_limit=-1), r"attach\(exact_limit=-1\).*int >= 0"),
    (dict(exact_limit=2.5), r"attach\(exact_limit=2\.5\).*int >= 0"),
    (dict(batch_size=0), r"attach\(batch_size=0\).*int >= 1"),
    (dict(batch_size=8.0), r"attach\(batch_size=8\.0\).*int >= 1"),
    (dict(layers=3), r"attach\(layers=3\): a int is not a layer selection.*glob pattern.*fn\(name, module\)"),
    (dict(layers={"0": True}), r"attach\(layers=\{'0': True\}\): a dict is not a layer selection"),
    (dict(layers=["0", 5]), r"attach\(layers=\['0', 5\]\): 5 \(int\) is not a module name"),
])
def test_bad_attach_arguments_fail_at_attach(kwargs, expected):
    model = cnn()
    with pytest.raises(InputError, match=expected):
        nnsim_hooks.attach(model, **kwargs)
    # nothing was hooked and the model can be attached again
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    nnsim_hooks.attach(model).detach()


def test_a_module_given_as_layers_is_asked_for_by_name():
    model = cnn()
    with pytest.raises(InputError, match=r"attach\(layers=<Linear>\): pass the module's name, layers='5'"):
        nnsim_hooks.attach(model, layers=model[5])


@pytest.mark.parametrize("output, expected", [("bogus", r"output='bogus'.*contrast.*callable"),
                                              (3, r"output=3.*callable")])
def test_bad_output_fails_at_attach_before_the_layers_are_looked_at(output, expected):
    # layers="nope" selects nothing (a ModelError of its own): the output is checked first
    with pytest.raises(OutputSpecError, match=expected):
        nnsim_hooks.attach(cnn(), output=output, layers="nope")


def test_good_attach_arguments_are_kept_as_plain_ints():
    import numpy as np

    with nnsim_hooks.attach(cnn(), sketch_dim=np.int64(64), seed=np.int32(3), stage1_dim=64, exact_limit=0,
                            batch_size=np.int64(2), layers=("0", "5")) as h:
        assert h.recipe.to_dict()["dim"] == 64 and type(h.recipe.dim) is int and type(h.recipe.seed) is int
        assert (h.recipe.stage1_dim, h.recipe.exact_limit, h.batch_size) == (64, 0, 2)
        assert type(h.batch_size) is int
        assert h.features(X(3)).shape == (3, 64)


def test_every_error_is_in_the_hierarchy():
    for cls in (AttachError, BatchCouplingError, InputError, ModelError, NonFiniteGradientError, OutputSpecError):
        assert issubclass(cls, NnsimError)
    from nnsim_hooks import errors

    exported = {name for name in nnsim_hooks.__all__ if name.endswith("Error")}
    defined = {name for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, NnsimError)}
    assert exported == defined  # DistributedError, CliError and OptionalDependencyError included
    assert all(getattr(nnsim_hooks, name) is getattr(errors, name) for name in defined)
    from nnsim_hooks.cli.commands import CliError

    assert CliError is errors.CliError


# -- optional libraries: one error class, naming the extra to install ----------------------------


def _without(monkeypatch, *missing):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in missing:
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_a_missing_optional_library_names_its_extra(monkeypatch):
    from nnsim_hooks.errors import OptionalDependencyError
    from nnsim_hooks.optional import require

    _without(monkeypatch, "timm", "pandas")
    with pytest.raises(OptionalDependencyError, match=r"timm models needs .*'timm'.*pip install 'nnsim_hooks\[timm\]'"):
        require("timm", "timm models")
    with nnsim_hooks.attach(cnn()) as h:
        # an ImportError too, for callers that catch that
        with pytest.raises(ImportError, match=r"to_pandas\(\) needs .*'pandas'.*pip install 'nnsim_hooks\[audit\]'"):
            h.coverage.to_pandas()


def test_missing_audit_libraries_are_named_together(monkeypatch):
    from nnsim_hooks.audit.run import require_audit_extra
    from nnsim_hooks.errors import OptionalDependencyError

    require_audit_extra()  # all installed here
    _without(monkeypatch, "sklearn", "PIL")
    with pytest.raises(OptionalDependencyError,
                       match=r"the audit needs scikit-learn, pillow, .*pip install 'nnsim_hooks\[audit\]'"):
        require_audit_extra()
