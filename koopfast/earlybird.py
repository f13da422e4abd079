"""Early-bird ticket detectors: stop dense training once the network's structure has settled.

Two detectors, each with ``update()`` to call once per epoch (after the epoch's training), the
history of distances, and the epoch of detection:

- ``EarlyBird.spline(model, probe)`` — You, Balestriero et al., TMLR 2022 (the rule of their code,
  GATECH-EIC/Spline-EB): the region codes (signs of every BatchNorm output, every unit and
  position) over fixed probe data; distance between two epochs = normalized Hamming distance per
  layer averaged over layers; the newest epoch is compared with each of the previous ``window``
  (3); early bird when the largest of those distances is below ``eps`` (0.16). Their code keeps
  every BatchNorm output as a float copy on the CPU; here codes stay packed on the model's device,
  one bit per value: 1/32 of the memory of float32 activations.
- ``EarlyBird.mask_distance(model, prune_ratio)`` — You et al., ICLR 2020: the global channel mask
  that prunes the fraction ``prune_ratio`` of BatchNorm channels with the smallest |gamma|;
  distance = fraction of differing mask bits; early bird when the newest mask is within ``eps``
  (0.1) of each of the previous ``window`` (4) masks (the authors keep the last 5 masks). Train
  with their L1 penalty on BatchNorm scales (:func:`add_bn_l1_subgradient`).

Epochs are counted from 0 by the calls to ``update()``; ``epoch`` is the index of the call that
first found an early bird (the authors' epoch index when ``update()`` follows every epoch from the
first). A call that fails (a bad probe, a changed model) raises and leaves the detector as it was.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast._probe import CodeSet, Probe, check_probe, first_batch, model_device, record_codes
from koopfast._spline_layers import BatchNorm, traced_spline_layers
from koopfast.masks import global_topk

__all__ = ["EarlyBird", "MaskDistanceEarlyBird", "SplineEarlyBird", "add_bn_l1_subgradient"]


class EarlyBird(ABC):
    """Common state of the detectors: build them with :meth:`spline` or :meth:`mask_distance`.

    Attributes:
        history: per ``update()``, the largest distance of the newest epoch to the previous
            ``window`` epochs (None while fewer than ``window`` epochs came before).
        distances: per ``update()``, the distances to each of the previous ``window`` epochs,
            oldest first (empty while fewer came before).
        epoch: index of the ``update()`` call that first found an early bird, or None.
    """

    _fn = "koopfast.EarlyBird"
    _strict = True  # early bird iff max distance < eps (False: <= eps)

    def __init__(self, window: int, eps: float):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{self._fn}: expected window to be a positive int, got {window!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
            raise ValueError(f"{self._fn}: expected eps in [0, 1], got {eps!r}")
        self.window = window
        self.eps = float(eps)
        self.history: list[float | None] = []
        self.distances: list[list[float]] = []
        self.epoch: int | None = None
        self._kept: deque = deque(maxlen=window)

    @staticmethod
    def spline(
        model: nn.Module,
        probe: Probe,
        *,
        window: int = 3,
        eps: float = 0.16,
        modules: Sequence[str] | None = None,
    ) -> SplineEarlyBird:
        """The spline (region code) detector; see :class:`SplineEarlyBird`."""
        return SplineEarlyBird(model, probe, window=window, eps=eps, modules=modules)

    @staticmethod
    def mask_distance(
        model: nn.Module, prune_ratio: float, *, window: int = 4, eps: float = 0.1
    ) -> MaskDistanceEarlyBird:
        """The BatchNorm channel-mask detector; see :class:`MaskDistanceEarlyBird`."""
        return MaskDistanceEarlyBird(model, prune_ratio, window=window, eps=eps)

    @property
    def detected(self) -> bool:
        return self.epoch is not None

    @property
    def updates(self) -> int:
        return len(self.history)

    def update(self) -> bool:
        """Measures the model now (call once per epoch) and compares it with the kept epochs.
        Returns whether an early bird has been found, at this call or before."""
        state = self._measure()
        if len(self._kept) == self.window:
            dists = self._distances(state, list(self._kept))
            largest = max(dists)
            if self.epoch is None and (largest < self.eps if self._strict else largest <= self.eps):
                self.epoch = len(self.history)
            self.history.append(largest)
            self.distances.append(dists)
        else:
            self.history.append(None)
            self.distances.append([])
        self._kept.append(state)
        return self.detected

    @property
    def memory_bytes(self) -> int:
        """Bytes of the kept epochs' codes or masks."""
        return sum(self._state_bytes(s) for s in self._kept)

    @abstractmethod
    def _measure(self):
        """The model's state now (codes or a mask), kept on its device."""

    @abstractmethod
    def _distances(self, state, previous: list) -> list[float]:
        """The distance of `state` to each of `previous`, oldest first."""

    @abstractmethod
    def _state_bytes(self, state) -> int:
        """Memory held by one kept state."""


class SplineEarlyBird(EarlyBird):
    """Spline early-bird detection on region codes (use :meth:`EarlyBird.spline`).

    Args:
        model: the network being trained.
        probe: fixed input data, a batch tensor or a re-iterable of batches (tuples ``(x, ...)``
            allowed), run in eval mode at every ``update()``. The authors use a 2-D grid of
            mixtures of two images (10,000 points); any fixed set of inputs works.
        window: how many previous epochs the newest is compared with (3).
        eps: early bird when the largest of those distances is below eps (0.16).
        modules: names of the modules whose outputs are coded. Default: every BatchNorm (the
            authors' choice); for a model without BatchNorm, the pre-activations of its hidden
            linear and convolutional layers.
    """

    _fn = "koopfast.EarlyBird.spline"

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        *,
        window: int = 3,
        eps: float = 0.16,
        modules: Sequence[str] | None = None,
    ):
        super().__init__(window, eps)
        fn = self._fn
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
        check_probe(probe, fn=fn)
        named = dict(model.named_modules())
        if modules is not None:
            if isinstance(modules, str) or not modules:
                raise ValueError(f"{fn}: expected modules to be a non-empty list of module names, got {modules!r}")
            unknown = [m for m in modules if m not in named]
            if unknown:
                raise ValueError(f"{fn}: expected modules among the model's module names, got unknown {unknown}")
            targets = {m: named[m] for m in modules}
        else:
            targets = {n: m for n, m in named.items() if isinstance(m, BatchNorm)}
            if not targets:
                traced = traced_spline_layers(model, first_batch(probe, model_device(model), fn=fn), fn=fn)
                targets = {u.code_name: u.code_module for u in traced.layers}
        self.model = model
        self.probe = probe
        self.modules = list(targets)
        self._targets = targets

    def codes(self) -> dict[str, CodeSet]:
        """The region codes of the model now, per coded module."""
        return record_codes(self.model, self._targets, self.probe, fn=self._fn)

    def _measure(self) -> dict[str, CodeSet]:
        state = self.codes()
        if self._kept:
            for name, before in self._kept[-1].items():
                now = state[name]
                if now.codes.shape != before.codes.shape or now.bits != before.bits:
                    raise ValueError(
                        f"{self._fn}: expected the codes of {name!r} to keep their shape between epochs "
                        f"({list(before.codes.shape)}, {before.bits} bits per unit), got {list(now.codes.shape)}, "
                        f"{now.bits} bits: did the model or the probe change?"
                    )
        return state

    def _distances(self, state: dict[str, CodeSet], previous: list[dict[str, CodeSet]]) -> list[float]:
        names = self.modules
        a = [state[n].codes for _ in previous for n in names]
        b = [p[n].codes for p in previous for n in names]
        per_unit = ops.hamming_distance(a, b)  # one call for all layers and epochs
        totals = torch.stack([d.sum() for d in per_unit]).cpu().double().view(len(previous), len(names))
        sizes = torch.tensor([state[n].units * state[n].bits for n in names], dtype=torch.float64)
        per_layer = totals / sizes.clamp_min(1)
        return per_layer.mean(1).tolist()

    def _state_bytes(self, state: dict[str, CodeSet]) -> int:
        return sum(c.codes.numel() * c.codes.element_size() for c in state.values())


class MaskDistanceEarlyBird(EarlyBird):
    """Early-bird detection from BatchNorm channel masks (use :meth:`EarlyBird.mask_distance`).

    Args:
        model: the network being trained (with BatchNorm layers that have affine scales).
        prune_ratio: the fraction of channels the mask prunes, in [0, 1): the channels with the
            smallest |gamma| over all BatchNorm layers together. The mask keeps exactly
            round((1 - prune_ratio) N) of the N channels (kf.masks.global_topk; ties by position);
            the authors' threshold keeps N - floor(prune_ratio N) - 1 of distinct values, one fewer
            at most.
        window: how many previous masks the newest is compared with (4: the authors keep 5).
        eps: early bird when every one of those distances is at most eps (0.1).
    """

    _fn = "koopfast.EarlyBird.mask_distance"
    _strict = False

    def __init__(self, model: nn.Module, prune_ratio: float, *, window: int = 4, eps: float = 0.1):
        super().__init__(window, eps)
        fn = self._fn
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
        bns = {n: m for n, m in model.named_modules() if isinstance(m, BatchNorm)}
        if not bns:
            raise ValueError(f"{fn}: expected a model with BatchNorm layers, got {type(model).__name__} without any")
        no_scale = [n for n, m in bns.items() if m.weight is None]
        if no_scale:
            raise ValueError(f"{fn}: expected BatchNorm layers with affine scales, got affine=False in {no_scale}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"{fn}: expected prune_ratio in [0, 1), got {prune_ratio!r}")
        self.model = model
        self.prune_ratio = float(prune_ratio)
        self._bns = bns

    def masks(self) -> dict[str, Tensor]:
        """The channel masks of the model now: ``dict[BatchNorm name -> bool Tensor[channels]]``,
        True = kept."""
        scales = {n: m.weight.detach() for n, m in self._bns.items()}
        return global_topk(scales, self.prune_ratio, by="abs")

    def _measure(self) -> Tensor:
        mask = torch.cat([m.reshape(-1) for m in self.masks().values()])
        return ops.sign_codes(mask.view(1, -1), 0)  # one unit of N bits: [1, ceil(N / 64)]

    def _distances(self, state: Tensor, previous: list[Tensor]) -> list[float]:
        channels = sum(m.num_features for m in self._bns.values())
        diff = ops.hamming_distance([state] * len(previous), previous)
        return (torch.cat(diff).cpu().double() / max(channels, 1)).tolist()

    def _state_bytes(self, state: Tensor) -> int:
        return state.numel() * state.element_size()


def add_bn_l1_subgradient(model: nn.Module, strength: float = 1e-4) -> None:
    """Adds ``strength * sign(gamma)`` to the gradient of every BatchNorm scale: the L1 penalty on
    BatchNorm scales (network slimming) that You et al. train with before drawing channel masks.
    Call after ``loss.backward()`` and before ``optimizer.step()``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"koopfast.earlybird.add_bn_l1_subgradient: expected a finite strength, got {strength!r}")
    for m in model.modules():
        if isinstance(m, BatchNorm) and m.weight is not None and m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=strength)
