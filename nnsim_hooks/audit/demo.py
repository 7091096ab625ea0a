"""The embedded default: scikit-learn's digits with planted label noise and a small CNN.

Everything here runs offline in seconds on 2 CPU cores: the 1,797 digits (8 x 8,
grey levels 0..16) ship with scikit-learn, and the CNN has about 38,000 parameters.

    >>> data = noisy_digits(noise=0.15, seed=0)
    >>> model = small_cnn()
    >>> train(model, data.images, data.noisy_labels, epochs=40)

``noisy_digits`` flips a fraction of the labels to a uniformly drawn *other* class
(symmetric noise) and keeps the true labels beside them, so that the demo can show the
paper's headline: a network trained on the noisy labels agrees with the true labels
more often than with the labels it was trained on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

logger = logging.getLogger(__name__)

#: The share of labels flipped by default (the issue asks for 10-15%).
DEFAULT_NOISE = 0.15
#: Default training epochs: enough to fit the clean structure, not enough to memorise the noise.
DEFAULT_EPOCHS = 30


@dataclass
class NoisyDigits:
    """Digits images, the labels with planted noise and the true labels."""

    images: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    noisy_labels: np.ndarray  # [N] int64, what the network is trained on
    true_labels: np.ndarray  # [N] int64
    flipped: np.ndarray  # [N] bool, noisy != true

    def __len__(self) -> int:
        return len(self.noisy_labels)

    def dataset(self) -> "torch.utils.data.TensorDataset":
        """``(image, noisy label)`` pairs, in the order of the arrays."""
        return torch.utils.data.TensorDataset(self.images, torch.as_tensor(self.noisy_labels))


def noisy_digits(noise: float = DEFAULT_NOISE, seed: int = 0, limit: Optional[int] = None) -> NoisyDigits:
    """Load scikit-learn's digits and flip ``noise`` of the labels (exactly
    ``round(noise * N)`` of them) to another class drawn uniformly.

    ``limit`` keeps a random subset of that many samples (stratified by nothing: a plain
    random draw with the same seed), for quick runs and tests.
    """
    if not 0 <= noise < 1:
        raise InputError(f"noise must be a fraction in [0, 1), got {noise}")
    from ..optional import require

    digits = require("sklearn.datasets", "the embedded demo").load_digits()
    rng = np.random.default_rng(seed)
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be at least 1, got {limit}")
        keep = np.sort(rng.permutation(len(labels))[: min(limit, len(labels))])
        images, labels = images[keep], labels[keep]
    n = len(labels)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.permutation(n)[: int(round(noise * n))]] = True
    noisy = labels.copy()
    # Adding 1..9 modulo 10 draws another class uniformly.
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, size=int(flipped.sum()))) % 10
    return NoisyDigits(torch.from_numpy(images).unsqueeze(1), noisy, labels, flipped)


def small_cnn(num_classes: int = 10, width: int = 16, seed: int = 0) -> nn.Module:
    """Two 3x3 convolutions, a max-pool and two dense layers for 8x8 grey images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels,
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    until_memorised: bool = False,
    max_epochs: int = 400,
    progress: bool = False,
) -> dict:
    """Train ``model`` with Adam on ``(images, labels)``; return a small history.

    ``until_memorised=True`` keeps training (up to ``max_epochs``, no weight decay) until
    every training label is predicted, noisy ones included: the regime where single-model
    scores such as cleanlab's on the training predictions lose their signal.
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0 if until_memorised else weight_decay)
    total = max_epochs if until_memorised else epochs
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train CNN", unit="epoch", leave=False)
    history = {"epochs": 0, "train_accuracy": float("nan")}
    model.train()
    with one_thread():
        _epochs(model, opt, images, labels_t, generator, batch_size, total, until_memorised, bar, history)
    if bar is not None:
        bar.close()
    model.eval()
    history["train_accuracy"] = accuracy(model, images, labels_t)
    logger.info("trained %d epochs, train accuracy %.4f", history["epochs"], history["train_accuracy"])
    return history


class one_thread:
    """Run torch on one CPU thread inside the block. For this tiny network more threads
    gain little, and on a shared machine (other processes on the cores) they lose a lot:
    OpenMP threads spin while waiting for each other (10x slower measured on 2 busy cores)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _epochs(model, opt, images, labels_t, generator, batch_size, total, until_memorised, bar, history):
    n = len(labels_t)
    for epoch in range(total):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(images[idx]), labels_t[idx]).backward()
            opt.step()
        history["epochs"] = epoch + 1
        if bar is not None:
            bar.update(1)
        if until_memorised and (epoch + 1) % 5 == 0:
            acc = accuracy(model, images, labels_t)
            if bar is not None:
                bar.set_postfix(train_acc=f"{acc:.3f}")
            if acc >= 1.0:
                break


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities ``[N, C]`` in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([F.softmax(model(images[s : s + batch_size]), 1) for s in range(0, len(images), batch_size)])
    model.train(was_training)
    return out.numpy()


def accuracy(model: nn.Module, images: torch.Tensor, labels) -> float:
    pred = predict_proba(model, images).argmax(1)
    return float((pred == np.asarray(labels)).mean())


def agreement(predictions, labels) -> float:
    """Share of samples whose prediction equals the label (NaN for no sample)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else math.nan


# -- the embedded default run (``nnsim audit`` without data) -----------------------------


def demo_config(noise: float, epochs: int, limit: Optional[int], seed: int, k: int, sketch_dim: Optional[int],
                output: Optional[str], thresholds: Optional[dict]) -> dict:
    """What identifies a demo run (an interrupted run resumes only with the same)."""
    return {
        "demo": "digits",
        "noise": noise,
        "epochs": epochs,
        "limit": limit,
        "seed": seed,
        "k": k,
        "sketch_dim": sketch_dim,
        "output": output,
        "thresholds": thresholds or {},
    }


def _load_or_train(folder, data: NoisyDigits, epochs: int, seed: int, progress: bool):
    """The trained CNN, saved in ``folder/demo/model.pt`` so that a resumed run uses the
    very same weights (the index refuses features of another model)."""
    import io as _io
    from pathlib import Path

    from ..atomic import write_bytes_atomic
    from ..safe_files import make_folder

    model = small_cnn(seed=seed)
    path = Path(folder) / "demo" / "model.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        logger.info("reusing the CNN trained by the interrupted run (%s)", path)
        return model, None
    history = train(model, data.images, data.noisy_labels, epochs=epochs, seed=seed, progress=progress)
    buf = _io.BytesIO()
    torch.save(model.state_dict(), buf)
    make_folder(path.parent)  # never through a link
    write_bytes_atomic(path, buf.getvalue())
    return model, history


def run_demo(out_dir, **options):
    """Digits with planted noise, a CNN trained on the fly, then the audit, saved in
    ``out_dir``; options as :func:`_run_demo`. Runs torch on one thread (see
    :class:`one_thread`): the network is tiny."""
    with one_thread():
        return _run_demo(out_dir, **options)


def _run_demo(
    out_dir,
    *,
    noise: float = DEFAULT_NOISE,
    epochs: int = DEFAULT_EPOCHS,
    limit: Optional[int] = None,
    seed: int = 0,
    k: int = 10,
    sketch_dim: Optional[int] = None,
    output: Optional[str] = None,
    thresholds: Optional[dict] = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Digits with planted noise, a CNN trained on the fly, then the audit, saved in
    ``out_dir``. Returns the :class:`~nnsim_hooks.audit.AuditResult`; its
    ``summary["extra"]`` holds the truth the demo knows (agreements, planted noise,
    precision and recall of the flags)."""
    import time

    from .checks.arrays import agreement as share_equal
    from .output_folder import prepare_out_dir
    from .run import audit

    from .thresholds import Thresholds

    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    if not 0 <= noise < 1:
        raise InputError(f"noise must be a fraction in [0, 1), got {noise}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    Thresholds.make(thresholds)  # bad thresholds fail before the training
    started = time.time()
    config = demo_config(noise, epochs, limit, seed, k, sketch_dim, output, thresholds)
    prepare_out_dir(out_dir, config, overwrite=overwrite)
    data = noisy_digits(noise, seed=seed, limit=limit)
    model, history = _load_or_train(out_dir, data, epochs, seed, progress)
    predictions = predict_proba(model, data.images).argmax(1)
    result = audit(
        model,
        data.dataset(),
        out_dir=out_dir,
        k=k,
        sketch_dim=sketch_dim,
        output=output,
        thresholds=thresholds,
        progress=progress,
        seed=seed,
        config=config,
        save=False,
        class_names=[str(c) for c in range(10)],
    )
    flagged = result.table["is_label_issue"].to_numpy(dtype=bool)
    result.summary["extra"] = {
        "dataset": f"scikit-learn digits, {len(data)} samples, 8x8",
        "planted_noise_rate": float(data.flipped.mean()),
        "planted_flips": int(data.flipped.sum()),
        "training_epochs": epochs if history is None else history["epochs"],
        "agreement_with_noisy_labels": share_equal(predictions, data.noisy_labels),
        "agreement_with_true_labels": share_equal(predictions, data.true_labels),
        "label_issue_precision": float(data.flipped[flagged].mean()) if flagged.any() else float("nan"),
        "label_issue_recall": float(flagged[data.flipped].mean()) if data.flipped.any() else float("nan"),
    }
    result.summary["seconds"] = round(time.time() - started, 2)
    result.save(out_dir, _finish=True)
    return result
