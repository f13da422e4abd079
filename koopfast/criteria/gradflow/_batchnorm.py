"""``source="bn"``: which BatchNorm scores which layer's output units."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from koopfast._torch_compat import BATCHNORM
from koopfast.prunable import units_of

# Parameter-free, elementwise modules that may sit between a layer and its BatchNorm: the
# gradient-flow authors' VGG is Conv → ReLU → BatchNorm (flowandprune, models.py), the usual
# layout Conv → BatchNorm → ReLU. Either way the BatchNorm's channels are the layer's output units.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)


@dataclass(frozen=True)
class BatchNormOf:
    """The affine BatchNorm scoring a layer: names of its scale γ and shift β."""

    scale: str
    shift: str


def batchnorm_pairs(model: nn.Module, fn: str) -> dict[str, BatchNormOf]:
    """Conv/linear weight name -> the affine BatchNorm registered after that layer with at most
    parameter-free elementwise modules between them (among leaf modules, in registration order:
    the order of nn.Sequential and most blocks)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    pairs: dict[str, BatchNormOf] = {}
    for i, (layer_name, layer) in enumerate(leaves):
        units = units_of(layer, "weight")
        if units is None:
            continue
        j = i + 1
        while j < len(leaves) and isinstance(leaves[j][1], ELEMENTWISE):
            j += 1
        if j == len(leaves):
            continue
        bn_name, bn = leaves[j]
        if isinstance(bn, BATCHNORM) and bn.affine and bn.num_features == units.count(layer.weight.shape):
            prefix = f"{bn_name}." if bn_name else ""
            pairs[f"{layer_name}.weight" if layer_name else "weight"] = BatchNormOf(f"{prefix}weight", f"{prefix}bias")
    if not pairs:
        raise ValueError(
            f"{fn}: source='bn' needs conv/linear layers each followed by an affine BatchNorm (directly, or after "
            "parameter-free elementwise modules such as ReLU); found none"
        )
    return pairs
