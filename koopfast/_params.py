"""Which parameters a criterion scores: a model's prunable parameters, or the caller's choice."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

# Layers whose weights (and biases) are pruned by default: convolutions and linear layers, as in
# the Koopman and gradient-flow papers' code. Normalization layers and embeddings are left out.
PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

ParamSource = nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]


def named_prunable(source: ParamSource, *, fn: str, include_bias: bool = True) -> dict[str, Tensor]:
    """Named tensors to score, in a fixed order.

    A module gives the weights (and biases, if include_bias) of its conv and linear layers, named
    as in ``model.named_parameters()``; a dict or an iterable of (name, tensor) pairs is taken
    as given. Raises ValueError naming ``fn`` when there is nothing to score.
    """
    if isinstance(source, nn.Module):
        out: dict[str, Tensor] = {}
        for module_name, module in source.named_modules():
            if not isinstance(module, PRUNABLE_LAYERS):
                continue
            prefix = f"{module_name}." if module_name else ""
            for pname, p in module.named_parameters(recurse=False):
                if pname == "weight" or (include_bias and pname == "bias"):
                    out[prefix + pname] = p
        if not out:
            raise ValueError(
                f"{fn}: expected a model with conv or linear layers to score, got {type(source).__name__} "
                "without any (pass a dict of named tensors to choose them yourself)"
            )
        return out
    if isinstance(source, Mapping):
        out = dict(source)
    else:
        try:
            out = dict(source)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{fn}: expected a model, a dict of named tensors or (name, tensor) pairs, got {type(source).__name__}"
            ) from exc
    if not out:
        raise ValueError(f"{fn}: expected at least one named tensor, got none")
    for name, t in out.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: expected {name!r} to be a tensor, got {type(t).__name__}")
    return out
