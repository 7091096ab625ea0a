"""A few epochs of plain training, shared by the examples (not part of the package)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader


def train(model: nn.Module, dataset, epochs: int = 5, lr: float = 3e-3, batch_size: int = 8, seed: int = 0) -> float:
    """Train ``model`` on ``(input, label)`` pairs with Adam; returns the final training accuracy."""
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), torch.as_tensor(y)).backward()
            optimizer.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x).argmax(1) == torch.as_tensor(y)).sum())
            total += len(y)
    return correct / total
