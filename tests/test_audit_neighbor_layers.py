"""audit(neighbor_layers=...): the neighbours come from the chosen layers' gradients (brute
force over the same features), the paper's density and denoising from every layer."""

import numpy as np
import pytest
import torch

import nnsim_hooks
from nnsim_hooks.audit.neighbor_layers import modules_with_parameters, neighbor_selector
from nnsim_hooks.audit.output_choice import full_outputs
from nnsim_hooks.errors import InputError, ModelError


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def brute_force_neighbours(model, x, layers, sketch_dim, k):
    with nnsim_hooks.attach(model, output=full_outputs, layers=layers, sketch_dim=sketch_dim, seed=0) as h:
        f = h.features(x).double()
    f = torch.nn.functional.normalize(f.reshape(len(x), -1), dim=1)
    s = f @ f.T
    s.fill_diagonal_(-np.inf)
    sims, ids = torch.topk(s, k, dim=1)
    return ids.numpy(), sims.numpy()


def test_first_half_selects_the_first_half_of_the_modules_with_parameters():
    model = mlp()
    assert modules_with_parameters(model) == ["0", "2", "4", "6"]
    select = neighbor_selector(model, "first_half")
    assert [n for n, m in model.named_modules() if select(n, m)] == ["0", "2"]
    odd = torch.nn.Sequential(*list(mlp())[:5])  # three Linear layers: two are taken
    select = neighbor_selector(odd, "first-half")
    assert [n for n, m in odd.named_modules() if n and select(n, m)] == ["0", "2"]
    assert neighbor_selector(model, None) is None and neighbor_selector(model, "all") is None
    with pytest.raises(InputError, match="neighbor_layers must be"):
        neighbor_selector(model, 3)


def test_neighbours_come_from_the_chosen_layers_and_denoising_from_all(data):
    model = mlp().eval()
    k, sketch = 5, 64
    whole = nnsim_hooks.audit(model, data, progress=False, sketch_dim=sketch, k=k, save=False)
    early = nnsim_hooks.audit(model, data, progress=False, sketch_dim=sketch, k=k, save=False,
                              neighbor_layers="first_half")
    x = data.tensors[0]
    for result, layers in ((whole, None), (early, ["0", "2"])):
        ids, sims = result.neighbor_arrays()
        want_ids, want_sims = brute_force_neighbours(model, x, layers, sketch, k)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
        assert (ids == want_ids).mean() > 0.95  # ties aside, the same neighbours
    assert not np.array_equal(whole.neighbor_arrays()[0], early.neighbor_arrays()[0])
    # the paper's quantities ignore the choice: every layer, the predicted class's contrast
    for column in ("density", "effective_neighbors", "denoising_factor"):
        np.testing.assert_allclose(early.table[column].to_numpy(float), whole.table[column].to_numpy(float),
                                   rtol=1e-6, equal_nan=True)
    assert early.summary["denoising_output"] == whole.summary["denoising_output"] == "contrast_predicted"
    assert early.summary["neighbor_layers"].startswith("first_half (2 of 4 modules, '0' to '2')")
    assert whole.summary["neighbor_layers"] == "all"


def test_neighbor_layers_that_select_nothing_are_refused(data):
    with pytest.raises(ModelError, match="selects no module"):
        nnsim_hooks.audit(mlp().eval(), data, progress=False, sketch_dim=32, k=3, save=False,
                          neighbor_layers=["missing*"])


@pytest.mark.slow
def test_cli_neighbor_layers(tmp_path, capsys):
    import json

    pytest.importorskip("timm")
    from nnsim_hooks.cli import commands as cli
    from nnsim_hooks.integrations.synthetic import make_image_folder

    data = tmp_path / "images"
    make_image_folder(str(data), classes=("circle", "square"), per_class=5, size=(24, 24))
    fast = ["--no-progress", "--k", "3", "--sketch-dim", "64", "--batch-size", "8", "--model", "timm:test_resnet",
            "--num-classes", "2", "--data", str(data)]
    assert cli.main(["audit", "--neighbor-layers", "first-half", "--out", str(tmp_path / "a")]) != 0
    assert "--neighbor-layers given without --data" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--neighbor-layers", " , ", "--out", str(tmp_path / "b")]) != 0
    assert "--neighbor-layers is empty" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--neighbor-layers", "nope", "--out", str(tmp_path / "c")]) != 0
    assert "selects no module" in capsys.readouterr().err
    assert cli.main(["audit", *fast, "--neighbor-layers", "first-half", "--out", str(tmp_path / "d")]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["neighbor_layers"].startswith("first_half (")
