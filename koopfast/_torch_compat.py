"""The torch internals koopfast relies on, named in one place (torch's API surface, not ours).

Everywhere else koopfast uses only public names of torch and of its own modules
(tests/test_layering.py enforces it); what torch offers only under an underscore name is read
here, once, each with the reason, so that a torch release that moves one breaks one line:

- the common base classes of torch's layer families (no public base covers every BatchNorm /
  normalization / convolution / transposed-convolution class, lazy and sync variants included);
- the ``_tensor_name`` of a torch.nn.utils.prune pruning method: torch's ``BasePruningMethod.apply``
  stores the name of the pruned tensor there, and its forward pre-hook (``apply_mask``) and
  ``remove`` read it back; :mod:`koopfast.prune` builds the same state as torch without torch's
  transient all-ones mask, so it must set and read that attribute too (no public setter exists);
- the ``_foreach`` kernels: what torch's own optimizers use, the baseline the mask benchmarks
  compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

__all__ = [
    "BATCHNORM",
    "CONV",
    "CONV_TRANSPOSE",
    "NORMALIZATION",
    "foreach_copy_",
    "foreach_mul_",
    "pruned_tensor_name",
    "set_pruned_tensor_name",
]

# BatchNorm1d/2d/3d, SyncBatchNorm and the lazy variants (running statistics, per-channel affine).
BATCHNORM: type[nn.Module] = nn.modules.batchnorm._BatchNorm
# BATCHNORM and InstanceNorm1d/2d/3d (the normalizations that may track running statistics).
NORMALIZATION: type[nn.Module] = nn.modules.batchnorm._NormBase
# Conv1d/2d/3d and ConvTranspose1d/2d/3d (and their lazy variants): weight, groups, output channels.
CONV: type[nn.Module] = nn.modules.conv._ConvNd
# ConvTranspose1d/2d/3d: weight [in, out / groups, ...], output units along dim 1 per group.
CONV_TRANSPOSE: type[nn.Module] = nn.modules.conv._ConvTransposeNd


def pruned_tensor_name(method: torch_prune.BasePruningMethod) -> str | None:
    """The name of the tensor a torch pruning method was applied to (None before ``apply``)."""
    return getattr(method, "_tensor_name", None)


def set_pruned_tensor_name(method: torch_prune.BasePruningMethod, name: str) -> None:
    """What ``BasePruningMethod.apply`` does first: name the tensor the method prunes, which its
    ``apply_mask`` (the forward pre-hook) and ``remove`` read."""
    method._tensor_name = name


def foreach_mul_(tensors: list[Tensor], other: float | Tensor | list[Tensor]) -> None:
    """``torch._foreach_mul_``: multiplies many tensors in place (one fused launch per device)."""
    torch._foreach_mul_(tensors, other)


def foreach_copy_(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``torch._foreach_copy_``: copies many tensors in place."""
    torch._foreach_copy_(targets, sources)
