"""The CUDA paths, checked on a machine without a GPU (issue 18, item 5).

- every computation keeps to the model's device: the model and inputs are put on a
  stand-in device (tests/fake_accelerator.py: CPU numbers behind a tensor that reports
  another device and refuses to be mixed with CPU tensors, as CUDA does) and each public
  path must give the CPU's numbers;
- device choice (``--device``, one rank per GPU under torchrun) with a mocked torch.cuda;
- FAISS on one GPU, on every GPU (sharded) and per torchrun rank, against a stand-in
  faiss module that exposes the GPU entry points and records how they are called;
- sketches drawn on the CPU whatever the target device (CUDA generators draw other numbers);
- 16-bit models: features come out in float32.

None of this replaces a run on a GPU (benchmarks/gpu_check.sh): it finds device mix-ups,
not CUDA-only failures or speed.
"""

from __future__ import annotations

import copy
import logging
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import nnsim_hooks
from nnsim_hooks.errors import InputError
from nnsim_hooks.index import GradientIndex
from nnsim_hooks.index import backend as backend_module
from nnsim_hooks.model_device import choose_device

from fake_accelerator import DEVICE, DeviceMode, OnDevice, model_on_device
from index_synthetic import clustered_rows


# -- every path keeps to the model's device -----------------------------------------------


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.attention(x, x, x)
        return self.head(self.norm(y).mean(1))


class _Scaled(nn.Module):
    """A parameter used directly (no layer rule): the generic rule."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)) * self.scale)


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), lambda: torch.randn(6, 8)),
    "conv": (_conv_net, lambda: torch.randn(6, 3, 7, 7)),
    "attention": (_Attention, lambda: torch.randn(6, 5, 16)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 3)),
                  lambda: torch.randint(0, 20, (6, 3))),
    "generic": (_Scaled, lambda: torch.randn(6, 8)),
}
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
PATHS = {
    "per_sample_gradients": lambda h, x, y: h.per_sample_gradients(x),
    "features": lambda h, x, y: h.features(x),
    "similarity": lambda h, x, y: h.similarity(x),
    "pair_similarity": lambda h, x, y: h.pair_similarity(x[:3], x[3:]),
    "density": lambda h, x, y: h.density(torch.utils.data.TensorDataset(x, y), progress=False, batch_size=3),
    "consistency": lambda h, x, y: h.consistency(torch.utils.data.TensorDataset(x, y), progress=False, batch_size=3),
    "build_index": lambda h, x, y: h.build_index(torch.utils.data.TensorDataset(x, y), progress=False,
                                                 batch_size=3).features,
}


def _numbers(out) -> np.ndarray:
    if isinstance(out, dict):
        return np.concatenate([_numbers(v).reshape(-1) for v in out.values()])
    if torch.is_tensor(out):
        return out.detach().cpu().double().numpy()
    return np.asarray(out, dtype=np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_every_path_keeps_to_the_models_device(model_name):
    make_model, make_inputs = MODELS[model_name]
    model, x = make_model().eval(), make_inputs()
    with nnsim_hooks.attach(model, sketch_dim=64) as h:
        expected = {name: _numbers(path(h, x, LABELS)) for name, path in PATHS.items()}
    on_device = model_on_device(copy.deepcopy(model))
    for name, path in PATHS.items():
        with DeviceMode(), nnsim_hooks.attach(on_device, sketch_dim=64) as h:
            out = path(h, OnDevice(x), OnDevice(LABELS))
        if torch.is_tensor(out) and name != "build_index":
            assert out.device == DEVICE, f"{name} came back on {out.device}, not on the model's device"
        np.testing.assert_allclose(_numbers(out), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_stand_in_device_catches_a_cpu_tensor():
    """The check above can fail: a model that adds a CPU constant is caught, and so is
    ``.numpy()`` on a device tensor."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return self.layer(x) + torch.ones(3)  # a CPU tensor next to the model's

    model = model_on_device(Mixed())
    with pytest.raises((RuntimeError, InputError), match="same device"), DeviceMode(), nnsim_hooks.attach(model) as h:
        h.features(OnDevice(torch.randn(4, 4)))
    with pytest.raises(TypeError, match="numpy"):
        OnDevice(torch.ones(2)).numpy()


def test_same_class_pairs_are_drawn_on_the_cpu_and_returned_on_the_labels_device():
    from nnsim_hooks.training import same_class_pairs

    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    expected = same_class_pairs(labels, 5, generator=torch.Generator().manual_seed(3))
    with DeviceMode():
        first, second = same_class_pairs(OnDevice(labels), 5, generator=torch.Generator().manual_seed(3))
    assert first.device == DEVICE and second.device == DEVICE
    assert torch.equal(first.cpu(), expected[0]) and torch.equal(second.cpu(), expected[1])


# -- device choice ------------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: torch.cuda reports n GPUs (0: no CUDA); torchrun's variables cleared."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_auto_is_the_cpu_without_cuda_and_gpu_0_with_it(gpus):
    gpus(0)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")
    gpus(2)
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda") == torch.device("cuda", 0)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    assert choose_device("cpu") == torch.device("cpu")


def test_one_rank_per_gpu_under_torchrun(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert choose_device("auto") == torch.device("cuda", 3)
    assert choose_device("cuda") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(InputError, match=r"LOCAL_RANK=4 .*4 GPU.*nproc-per-node=4"):
        choose_device("auto")
    monkeypatch.delenv("LOCAL_RANK")
    assert choose_device("auto", rank=5) == torch.device("cuda", 1)  # no torchrun: rank % GPUs


@pytest.mark.parametrize("requested, count, match", [
    ("cuda", 0, "no CUDA device"),
    ("cuda:2", 2, r"2 GPU\(s\), cuda:0 to cuda:1"),
    ("tpu", 1, "not a device|not supported"),
    ("mps", 1, "not supported"),
])
def test_a_device_that_is_not_there_is_a_clear_error(gpus, requested, count, match):
    gpus(count)
    with pytest.raises(InputError, match=match):
        choose_device(requested)


def test_a_bad_local_rank_is_a_clear_error(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(InputError, match="LOCAL_RANK='one'"):
        choose_device("auto")


def test_distributed_ranks_compute_on_their_own_gpu(gpus, monkeypatch):
    from nnsim_hooks.index.sharded import distributed

    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.Context(rank=3, world=4, backend="nccl", group=None).device == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.Context(rank=3, world=4, backend="nccl", group=None).device == torch.device("cuda", 1)
    gpus(0)
    assert distributed.Context(rank=3, world=4, backend="gloo", group=None).device == torch.device("cpu")


def test_init_from_env_picks_nccl_and_this_ranks_gpu(gpus, monkeypatch):
    import torch.distributed as dist

    from nnsim_hooks.index.sharded import distributed

    gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("device", torch.device(d)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.setdefault("backend", backend))
    assert distributed.init_from_env() is True
    assert seen == {"device": torch.device("cuda", 1), "backend": "nccl"}


def test_cli_device_option(gpus, tmp_path):
    from nnsim_hooks.cli import main

    gpus(0)
    code = main(["audit", "--data", str(tmp_path), "--model", "timm:resnet18", "--device", "cuda:0",
                 "--out", str(tmp_path / "out")])
    assert code == 1 and not (tmp_path / "out").exists()


# -- FAISS on GPU(s), against a stand-in faiss module -------------------------------------


class _GpuFaiss(types.ModuleType):
    """The installed faiss-cpu plus the GPU entry points of faiss-gpu. The 'GPU' indexes
    are CPU clones; every move is recorded in ``moves``."""

    def __init__(self, real, gpus: int, fail=False):
        super().__init__("faiss")
        self._real, self._gpus, self._fail = real, gpus, fail
        self.moves = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return self._gpus

    class StandardGpuResources:
        pass

    class GpuMultipleClonerOptions:
        shard = False

    def GpuParameterSpace(self):  # noqa: N802 - faiss's name
        if self._fail == "tune":
            return types.SimpleNamespace(set_index_parameter=self._refuse)
        return self._real.ParameterSpace()

    @staticmethod
    def _refuse(index, name, value):
        raise RuntimeError(f"could not set parameter {name}")

    def index_cpu_to_gpu(self, resources, device, index):
        if self._fail is True:
            raise RuntimeError("This index type is not implemented on GPU.")
        assert isinstance(resources, self.StandardGpuResources)
        self.moves.append(("one", device))
        return self._real.clone_index(index)

    def index_cpu_to_gpus_list(self, index, co=None, gpus=None):
        self.moves.append(("several", list(gpus), bool(co.shard)))
        return self._real.clone_index(index)


@pytest.fixture
def fake_faiss(monkeypatch, gpus):
    import faiss as real

    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def install(n: int, fail=False) -> _GpuFaiss:
        """``fail``: True, moving to a GPU raises; "tune", setting a search option on it does."""
        module = _GpuFaiss(real, n, fail)
        monkeypatch.setitem(sys.modules, "faiss", module)
        gpus(n)
        return module

    return install


@pytest.fixture(scope="module")
def rows():
    return clustered_rows(400, 16, seed=2)


def _cpu_answer(rows, kind="flat"):
    return GradientIndex.from_features(rows, index=kind, gpu=False).search(rows[:20], 5)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_shards_the_index_over_every_gpu_of_one_process(fake_faiss, rows, kind):
    faiss = fake_faiss(2)
    idx = GradientIndex.from_features(rows, index=kind, gpu=None)
    scores, ids = idx.search(rows[:20], 5)
    assert faiss.moves == [("several", [0, 1], True)]
    assert idx.backend.on_gpu and idx.backend.gpus == [0, 1]
    expected = _cpu_answer(rows, kind)
    np.testing.assert_array_equal(ids, expected[1])
    np.testing.assert_allclose(scores, expected[0], rtol=1e-6)


def test_faiss_uses_one_gpu_per_torchrun_rank(fake_faiss, rows, monkeypatch):
    faiss = fake_faiss(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    idx = GradientIndex.from_features(rows, gpu=True)
    idx.search(rows[:3], 2)
    assert faiss.moves == [("one", 1)]
    assert not idx.backend.supports_range_search and idx.backend.max_k == backend_module.GPU_MAX_K


def test_faiss_one_gpu(fake_faiss, rows):
    faiss = fake_faiss(1)
    GradientIndex.from_features(rows, gpu=None).search(rows[:3], 2)
    assert faiss.moves == [("one", 0)]


def test_gpu_counts_and_large_k_fall_back_to_exact_torch(fake_faiss, rows, monkeypatch):
    """A GPU index has no range search and caps k: the exact torch code answers instead."""
    fake_faiss(1)
    on_gpu = GradientIndex.from_features(rows, gpu=True)
    on_gpu.search(rows[:1], 1)  # moved to the 'GPU'
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the exact torch code then runs here
    on_cpu = GradientIndex.from_features(rows, gpu=False)
    np.testing.assert_allclose(on_gpu.neighbor_counts(0.5, progress=False), on_cpu.neighbor_counts(0.5, progress=False))
    big_k = backend_module.GPU_MAX_K + 1
    many = GradientIndex.from_features(clustered_rows(big_k + 10, 8, seed=4), gpu=True)
    ids = many.search(many.features[:2], big_k)[1]
    assert many.backend.on_gpu and (ids >= 0).all() and ids.shape == (2, big_k)
    assert on_gpu.backend.on_gpu


def test_an_index_that_cannot_move_stays_on_cpu_with_a_warning(fake_faiss, rows, caplog):
    fake_faiss(1, fail=True)
    with caplog.at_level(logging.WARNING, logger="nnsim_hooks.index.backend"):
        idx = GradientIndex.from_features(rows, gpu=None)
        scores, ids = idx.search(rows[:20], 5)
    assert not idx.backend.on_gpu
    assert "stays on CPU" in caplog.text
    np.testing.assert_array_equal(ids, _cpu_answer(rows)[1])


def test_an_index_whose_search_options_cannot_be_set_on_gpu_stays_on_cpu(fake_faiss, rows, caplog):
    fake_faiss(1, fail="tune")
    with caplog.at_level(logging.WARNING, logger="nnsim_hooks.index.backend"):
        idx = GradientIndex.from_features(rows, index="ivf", gpu=None)
        ids = idx.search(rows[:20], 5)[1]
    assert not idx.backend.on_gpu and "search options" in caplog.text
    np.testing.assert_array_equal(ids, _cpu_answer(rows, "ivf")[1])


def test_faiss_cpu_beside_a_gpu_says_how_to_get_faiss_gpu(monkeypatch, gpus, rows, caplog):
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("this FAISS has GPUs")
    gpus(2)
    monkeypatch.setattr(backend_module, "_TOLD_CPU_ONLY", False)
    with caplog.at_level(logging.WARNING, logger="nnsim_hooks.index.backend"):
        GradientIndex.from_features(rows, gpu=None).search(rows[:2], 2)
        GradientIndex.from_features(rows, gpu=None).search(rows[:2], 2)
    assert caplog.text.count("pip install faiss-gpu") == 1
    with pytest.raises(InputError, match="faiss-gpu"):
        GradientIndex.from_features(rows, gpu=True)


# -- sketches: drawn on the CPU, the same numbers for any target device -------------------


def test_sketch_matrices_are_drawn_on_the_cpu_whatever_the_target_device(monkeypatch):
    from nnsim_hooks.engine import sketch as sketch_module

    draws = []
    for name in ("randn", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            draws.append((_name, kwargs.get("device"), kwargs["generator"].device))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    shapes = {"a.weight": (300, 200), "b.weight": (64, 64), "b.bias": (64,)}
    recipe = sketch_module.SketchRecipe(dim=32, seed=7, stage1_dim=1024, exact_limit=100)
    on_cpu = sketch_module.Sketcher(recipe, shapes)
    on_device = sketch_module.Sketcher(recipe, shapes)
    with DeviceMode():
        moved = on_device.param_sketches(list(shapes), DEVICE, torch.float32)
        for name in shapes:
            on_device._hash_of(name, DEVICE, torch.float32)
    assert draws and all(device is None and generator.type == "cpu" for _, device, generator in draws)
    for name, sketch in moved.items():
        for side in ("row_matrix", "col_matrix"):
            expected, got = getattr(on_cpu.params[name], side), getattr(sketch, side)
            assert (expected is None) == (got is None)
            if got is not None:
                assert got.device == DEVICE and torch.equal(got.cpu(), expected)
        buckets, signs = on_device._hash_of(name, DEVICE, torch.float32)
        cpu_buckets, cpu_signs = on_cpu._hash_of(name, "cpu", torch.float32)
        assert buckets.device == DEVICE and torch.equal(buckets.cpu(), cpu_buckets)
        assert torch.equal(signs.cpu(), cpu_signs)


def test_features_on_the_stand_in_device_equal_the_cpus_bit_for_bit():
    model = nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 4)).eval()
    x = torch.randn(5, 40)
    with nnsim_hooks.attach(model, sketch_dim=32, seed=3) as h:
        expected = h.features(x)
    with DeviceMode(), nnsim_hooks.attach(model_on_device(copy.deepcopy(model)), sketch_dim=32, seed=3) as h:
        got = h.features(OnDevice(x))
    assert h.sketcher.stage1_dim > 32  # projected, not padded
    assert torch.equal(got.cpu(), expected)


# -- 16-bit models: features in float32 ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_models_exact_features_are_float32(dtype):
    """One Linear layer and output='sum': the per-sample gradient is [x_i, 1] repeated per
    output, exactly representable in 16 bits; sketch_dim above its size keeps it whole.
    Computed in 16 bits the unit rows would be off by ~1e-3."""
    model = nn.Linear(5, 3).to(dtype)
    x = torch.randn(6, 5).to(dtype)
    with nnsim_hooks.attach(model, output="sum", sketch_dim=64) as h:
        f = h.features(x)
    assert f.dtype == torch.float32
    g = torch.cat([x.double().repeat(1, 3), torch.ones(6, 3, dtype=torch.float64)], 1)  # weight rows, then bias
    expected = g / g.norm(dim=1, keepdim=True)
    assert torch.allclose(f.double()[:, :18], expected, rtol=0, atol=1e-6)
    assert not f[:, 18:].any()


def test_a_bfloat16_model_with_a_generic_layer_runs():
    """The generic rule's split of direct uses is checked against a re-run with a
    tolerance for the model's dtype (it raised a dtype error for bfloat16)."""
    model = _Scaled().eval().to(torch.bfloat16)
    with nnsim_hooks.attach(model, sketch_dim=64) as h:
        f = h.features(torch.randn(6, 8).to(torch.bfloat16))
        f = h.features(torch.randn(6, 8).to(torch.bfloat16))  # second batch: the checked split
    assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_labels_of_a_dataset_kept_on_the_device_are_read():
    from nnsim_hooks.audit.samples import fast_labels

    labels = torch.tensor([0, 2, -1, 1])
    data = torch.utils.data.TensorDataset(OnDevice(torch.zeros(4, 3)), OnDevice(labels))
    got = fast_labels(data)
    assert got is not None and got.tolist()[:2] == [0, 2] and got[3] == 1


@pytest.mark.slow
def test_an_audit_on_the_stand_in_device_gives_the_cpus_table(tmp_path):
    pytest.importorskip("pandas")
    x = torch.randn(40, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    data = torch.utils.data.TensorDataset(x, y)
    on_cpu = nnsim_hooks.audit(model, data, out_dir=tmp_path / "cpu", progress=False, k=5).table
    with DeviceMode():
        on_device = nnsim_hooks.audit(model_on_device(copy.deepcopy(model)), data, out_dir=tmp_path / "device",
                                      progress=False, k=5).table
    numbers = on_cpu.select_dtypes("number").columns
    assert len(numbers) > 5 and list(on_device.columns) == list(on_cpu.columns)
    np.testing.assert_allclose(on_device[numbers].to_numpy(float), on_cpu[numbers].to_numpy(float), rtol=1e-5,
                               atol=1e-6, equal_nan=True)
