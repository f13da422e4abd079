"""Which units of a model form the spline partition: conv/linear layers and their BatchNorms.

A *spline layer* is a linear or convolutional layer (``nn.Linear``, ``nn.Conv1d/2d/3d``) whose
output is a pre-activation, optionally through the BatchNorm that directly consumes its output.
Each output unit (feature, channel) is one hyperplane. A layer whose pre-activation is the
model's output (a classifier) is not a partitioning layer and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from koopfast._probe import eval_mode, forward_hooks, run_model

SPLINE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class SplineLayer:
    name: str
    layer: nn.Module
    bn_name: str | None = None
    bn: nn.Module | None = None

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def units(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def code_name(self) -> str:
        """The module whose output is the pre-activation: the BatchNorm, or the layer itself."""
        return self.bn_name if self.bn is not None else self.name

    @property
    def code_module(self) -> nn.Module:
        return self.bn if self.bn is not None else self.layer


def _candidates(model: nn.Module, fn: str) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SPLINE_LAYER_TYPES)}
    if not layers:
        raise ValueError(
            f"{fn}: expected a model with linear or convolutional layers (nn.Linear, nn.Conv1d/2d/3d), "
            f"got {type(model).__name__} without any"
        )
    bns = {n: m for n, m in model.named_modules() if isinstance(m, BatchNorm)}
    return layers, bns


def _units_match(layer: nn.Module, bn: nn.Module) -> bool:
    return bn.num_features == layer.weight.shape[0]


def _tensors_in(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors_in(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors_in(o)]
    return []


def _same_data(a: Tensor, b: Tensor) -> bool:
    return a.numel() > 0 and a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def traced_spline_layers(model: nn.Module, batch: Tensor, *, fn: str) -> list[SplineLayer]:
    """Spline layers found from the data flow of one forward pass on (the first two samples of)
    ``batch``: a BatchNorm is paired with the layer whose output tensor it receives (views of it
    included), and layers whose pre-activation is (a view of) the model's output are left out.
    Every output is kept alive during the pass, so no memory address is reused."""
    layers, bns = _candidates(model, fn)
    outputs: dict[str, Tensor] = {}
    bn_io: dict[str, tuple[Tensor, Tensor]] = {}

    def layer_hook(name: str):
        def hook(_m, _inputs, output):
            if isinstance(output, Tensor):
                outputs.setdefault(name, output)

        return hook

    def bn_hook(name: str):
        def hook(_m, inputs, output):
            if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
                bn_io.setdefault(name, (inputs[0], output))

        return hook

    hooks = {m: layer_hook(n) for n, m in layers.items()} | {m: bn_hook(n) for n, m in bns.items()}
    with eval_mode(model), forward_hooks(hooks):
        result = run_model(model, batch[:2], fn=fn, batch=batch)
    model_outputs = _tensors_in(result)

    found = []
    for name, layer in layers.items():
        out = outputs.get(name)
        if out is None:
            continue  # not used in the forward pass
        bn_name = next(
            (b for b, (x, _) in bn_io.items() if _same_data(x, out) and _units_match(layer, bns[b])),
            None,
        )
        pre_activation = bn_io[bn_name][1] if bn_name is not None else out
        if any(_same_data(pre_activation, y) for y in model_outputs):
            continue
        found.append(SplineLayer(name, layer, bn_name, bns[bn_name] if bn_name is not None else None))
    if not found:
        raise ValueError(
            f"{fn}: expected hidden linear or convolutional layers (whose outputs are not the model's output), "
            f"got none in {type(model).__name__}"
        )
    return found


def _holds_state(module: nn.Module) -> bool:
    """A module that computes with its own parameters or buffers (not a container, activation,
    pooling or dropout)."""
    if isinstance(module, (*SPLINE_LAYER_TYPES, BatchNorm)):
        return True
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return bool(own) and not list(module.children())


def registered_spline_layers(model: nn.Module, *, fn: str) -> list[SplineLayer]:
    """Spline layers found without running the model: a layer is paired with the BatchNorm of
    matching size that comes next among the modules holding parameters or buffers, in
    registration order, and the last layer in that order (the classifier) is left out. Right for
    models whose modules are registered in execution order (nn.Sequential, VGG, ResNet, MLPs)."""
    layers, _ = _candidates(model, fn)
    ordered = [(n, m) for n, m in model.named_modules() if _holds_state(m)]
    found = []
    for i, (name, module) in enumerate(ordered):
        if name not in layers:
            continue
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if nxt is not None and isinstance(nxt[1], BatchNorm) and _units_match(module, nxt[1]):
            found.append(SplineLayer(name, module, nxt[0], nxt[1]))
        else:
            found.append(SplineLayer(name, module))
    found = found[:-1]
    if not found:
        raise ValueError(
            f"{fn}: expected hidden linear or convolutional layers before the last one, got a single layer in "
            f"{type(model).__name__}"
        )
    return found
