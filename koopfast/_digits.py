"""A real, tiny learning problem for examples, tests and the demo: scikit-learn's digits.

1797 8×8 handwritten digits ship inside scikit-learn (nothing is downloaded). Pixel values are
scaled to [0, 1]; the split is stratified and seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load(seed: int = 0, test_fraction: float = 0.25) -> Split:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # an optional dependency: pip install scikit-learn
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )

    def tensors(x, y):
        return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long)

    return Split(*tensors(x_tr, y_tr), *tensors(x_te, y_te))


def mlp(hidden: Sequence[int] = (128,), *, batchnorm: bool = False, seed: int = 0) -> nn.Sequential:
    """64 -> hidden... -> 10 with ReLU (and BatchNorm1d before each ReLU if asked)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 64
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was_training)
    return acc


def train(
    model: nn.Module,
    split: Split,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[int], None] | None = None,
) -> torch.optim.Optimizer:
    """SGD with momentum on shuffled minibatches for `steps` steps; after_step(i) after each."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n = split.x_train.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    for i in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(i)
    return opt
