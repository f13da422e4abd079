"""Which units of a model form the spline partition: conv/linear layers and their BatchNorms.

A *spline layer* is a linear or convolutional layer (``nn.Linear``, ``nn.Conv1d/2d/3d``) whose
output is a pre-activation, optionally through the BatchNorm that directly consumes its output,
and whose pre-activation goes into a ReLU-like activation (ReLU, leaky ReLU, PReLU: one kink, at
0). Each output unit (feature, channel) is then one hyperplane of the input-space partition, the
max-affine spline operator the method describes. Left out, each with its reason: a layer whose
pre-activation is the model's output (a classifier), goes into another activation (GELU, ReLU6
with its second kink, SiLU, tanh: not a partition into half-spaces at 0), into no activation
(a linear bottleneck), or is first added to another branch (a residual sum: the boundary is that
of the sum, not of the unit).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from koopfast._probe import eval_mode, forward_hooks, run_model
from koopfast.prunable import is_hf_conv1d

SPLINE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_spline_layer(module: nn.Module) -> bool:
    """A linear or convolutional layer (Hugging Face's Conv1D, a linear layer stored [in, out],
    included)."""
    return isinstance(module, SPLINE_LAYER_TYPES) or is_hf_conv1d(module)


def unit_major_weight(layer: nn.Module) -> Tensor:
    """The layer's weight with its output units first ([out, ...]: Conv1D's [in, out] transposed)."""
    return layer.weight.t() if is_hf_conv1d(layer) else layer.weight


BatchNorm = nn.modules.batchnorm._BatchNorm
RELU_LIKE_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)

# aten operations (by name) that apply a ReLU-like activation, and those that pass a tensor on
# unchanged in value (views, copies, dropout in eval mode) on the way to it.
_RELU_LIKE_OPS = frozenset(
    {"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel", "rrelu_with_noise", "threshold"}
)
_PASS_THROUGH_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "t",
        "transpose",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "as_strided",
        "alias",
        "detach",
        "clone",
        "contiguous",
        "_to_copy",
        "dropout",
        "native_dropout",
        "flatten",
        "unflatten",
        "lift_fresh",
        "_reshape_alias",
    }
)


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
        return unit_major_weight(self.layer).shape[0]

    @property
    def code_name(self) -> str:
        """The module whose output is the pre-activation: the BatchNorm, or the layer itself."""
        return self.bn_name if self.bn is not None else self.name

    @property
    def code_module(self) -> nn.Module:
        return self.bn if self.bn is not None else self.layer


def _candidates(model: nn.Module, fn: str) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    layers = {n: m for n, m in model.named_modules() if is_spline_layer(m)}
    if not layers:
        raise ValueError(
            f"{fn}: expected a model with linear or convolutional layers (nn.Linear, nn.Conv1d/2d/3d), "
            f"got {type(model).__name__} without any"
        )
    bns = {n: m for n, m in model.named_modules() if isinstance(m, BatchNorm)}
    return layers, bns


def _units_match(layer: nn.Module, bn: nn.Module) -> bool:
    return bn.num_features == unit_major_weight(layer).shape[0]


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


class _OpLog(TorchDispatchMode):
    """The aten operations of a forward pass: (name, input storages, output storages). Every
    tensor is kept alive until the log is dropped, so no storage address is reused meanwhile."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, set[int], set[int], str | None]] = []
        self._alive: list[Tensor] = []
        self._modules: list[str] = []  # the leaf modules running now (their class names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        self._alive += outs
        where = self._modules[-1] if self._modules else None
        self.ops.append((func.overloadpacket.__name__, _storages(ins), _storages(outs), where))
        return out

    def watch(self, model: nn.Module) -> list:
        """Hooks that tell the log which leaf module each operation runs in."""

        def enter(module, _inputs) -> None:
            self._modules.append(type(module).__name__)

        def leave(*_) -> None:  # returns None: the module's output is left as it is
            self._modules.pop()

        handles = []
        for m in model.modules():
            if not list(m.children()):
                handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        return handles

    def consumers(self, t: Tensor, after: int) -> list[str]:
        """The operations that first use ``t``'s value (from op index ``after`` on), looking through
        views, copies and dropout; named ``op`` or ``op in Module`` when a module runs it."""
        frontier = _storages([t])
        found = []
        for name, ins, outs, where in self.ops[after:]:
            used = ins & frontier
            if not used:
                continue
            if name in _PASS_THROUGH_OPS:
                frontier |= outs
                continue
            found.append(name if where is None or name in _RELU_LIKE_OPS else f"{name} in {where}")
            frontier -= used & outs  # an in-place operation: later uses see its result, not t
        return found


def _storages(tensors: list[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0 and t.device.type != "meta"} - {0}


@dataclass(frozen=True)
class TracedLayers:
    """The spline layers of a model, and the conv/linear layers left out with the reason."""

    layers: list[SplineLayer]
    skipped: dict[str, str]


def traced_spline_layers(model: nn.Module, batch: Tensor, *, fn: str) -> TracedLayers:
    """Spline layers found from the data flow of one forward pass on (the first two samples of)
    ``batch``: a BatchNorm is paired with the layer whose output tensor it receives (views of it
    included); the pre-activation (the BatchNorm's output, or the layer's) must go into a
    ReLU-like activation and nothing else (see the module docstring for what is left out)."""
    layers, bns = _candidates(model, fn)
    outputs: dict[str, tuple[Tensor, int]] = {}
    bn_io: dict[str, tuple[Tensor, Tensor, int]] = {}
    log = _OpLog()

    def layer_hook(name: str):
        def hook(_m, _inputs, output):
            if isinstance(output, Tensor):
                outputs.setdefault(name, (output, len(log.ops)))

        return hook

    def bn_hook(name: str):
        def hook(_m, inputs, output):
            if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
                bn_io.setdefault(name, (inputs[0], output, len(log.ops)))

        return hook

    hooks = {m: layer_hook(n) for n, m in layers.items()} | {m: bn_hook(n) for n, m in bns.items()}
    handles = log.watch(model)
    try:
        with eval_mode(model), forward_hooks(hooks), log:
            result = run_model(model, batch[:2], fn=fn, batch=batch)
    finally:
        for h in handles:
            h.remove()
    model_outputs = _tensors_in(result)

    found, skipped = [], {}
    for name, layer in layers.items():
        if name not in outputs:
            skipped[name] = "not used in the forward pass"
            continue
        out, after = outputs[name]
        bn_name = next(
            (b for b, (x, _, _) in bn_io.items() if _same_data(x, out) and _units_match(layer, bns[b])),
            None,
        )
        if bn_name is not None:
            _, pre_activation, after = bn_io[bn_name]
        else:
            pre_activation = out
        if any(_same_data(pre_activation, y) for y in model_outputs):
            skipped[name] = "its output is the model's output (a classifier shapes no partition of its own)"
            continue
        why = _activation_problem(log.consumers(pre_activation, after), bn_name)
        if why is not None:
            skipped[name] = why
            continue
        found.append(SplineLayer(name, layer, bn_name, bns[bn_name] if bn_name is not None else None))
    if not found:
        reasons = "; ".join(f"{n!r}: {why}" for n, why in skipped.items())
        raise ValueError(
            f"{fn}: expected hidden linear or convolutional layers whose pre-activations go into a ReLU-like "
            f"activation (the partition the spline method describes), got none in {type(model).__name__} ({reasons})"
        )
    return TracedLayers(found, skipped)


def _activation_problem(consumers: list[str], bn_name: str | None) -> str | None:
    """Why a pre-activation used by these operations shapes no ReLU partition (None if it does)."""
    what = "its BatchNorm's output" if bn_name is not None else "its output"
    if not consumers:
        return f"{what} is not used"
    others = [c for c in consumers if c not in _RELU_LIKE_OPS]
    if not others:
        return None
    op = others[0]
    kind = op.split(" in ")[0]
    if kind in ("add", "add_", "sub", "sub_"):
        return f"{what} is added to another branch ({op}) before any activation: a residual sum"
    if kind in ("hardtanh", "hardtanh_", "relu6", "clamp", "clamp_"):
        return f"{what} goes into {op} (ReLU6-like: a second kink, two boundaries per unit)"
    if kind in ("convolution", "addmm", "mm", "bmm", "linear", "matmul", "native_batch_norm", "mean", "sum"):
        return f"{what} goes into {op} with no activation in between (a linear layer: no boundary of its own)"
    return f"{what} goes into {op}, not a ReLU-like activation (the method describes max-affine splines)"


def _holds_state(module: nn.Module) -> bool:
    """A module that computes with its own parameters or buffers (not a container, activation,
    pooling or dropout)."""
    if is_spline_layer(module) or isinstance(module, BatchNorm):
        return True
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return bool(own) and not list(module.children())


def _is_other_activation(module: nn.Module) -> bool:
    """An activation module that is not ReLU-like (torch's own, or a model library's *Activation)."""
    if isinstance(module, RELU_LIKE_MODULES):
        return False
    return type(module).__module__ == "torch.nn.modules.activation" or type(module).__name__.endswith("Activation")


def registered_spline_layers(model: nn.Module, *, fn: str) -> TracedLayers:
    """Spline layers found without running the model: a layer is paired with the BatchNorm of
    matching size that comes next among the modules holding parameters or buffers, in
    registration order, and the last layer in that order (the classifier) is left out. Right for
    models whose modules are registered in execution order (nn.Sequential, VGG, ResNet, MLPs).
    A layer whose next registered activation module is not ReLU-like is left out; one followed by
    no activation module is kept (its activation may be a function call, which only a probe sees)."""
    layers, _ = _candidates(model, fn)
    ordered = [(n, m) for n, m in model.named_modules() if _holds_state(m)]
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    position = {n: i for i, (n, _) in enumerate(leaves)}
    found, skipped = [], {}
    for i, (name, module) in enumerate(ordered):
        if name not in layers:
            continue
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if nxt is not None and isinstance(nxt[1], BatchNorm) and _units_match(module, nxt[1]):
            found.append(SplineLayer(name, module, nxt[0], nxt[1]))
        else:
            found.append(SplineLayer(name, module))
    classifier = found.pop() if found else None
    if classifier is not None:
        skipped[classifier.name] = "the last layer (taken as the classifier without a probe)"
    kept = []
    for unit in found:
        start = position.get(unit.code_name, position.get(unit.name, -1)) + 1
        following = next((m for _, m in leaves[start:] if not isinstance(m, (nn.Dropout, nn.Identity))), None)
        if following is not None and _is_other_activation(following):
            skipped[unit.name] = (
                f"followed by {type(following).__name__}, not a ReLU-like activation (the method describes "
                "max-affine splines)"
            )
        else:
            kept.append(unit)
    if not kept:
        reasons = "; ".join(f"{n!r}: {why}" for n, why in skipped.items())
        raise ValueError(
            f"{fn}: expected hidden linear or convolutional layers before the last one, each followed by a "
            f"ReLU-like activation, got none in {type(model).__name__} ({reasons})"
        )
    return TracedLayers(kept, skipped)
