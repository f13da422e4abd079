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

Each detector has a ``preset``: ``"koopfast"`` (the default) and one that reproduces the authors'
released code setting by setting, ``"spline_eb"`` and ``"early_bird_tickets"``; each class's
docstring lists the settings, the file each comes from, and how the default differs.

Measurements are counted from 0; ``history[i]`` belongs to measurement ``i`` and ``epoch`` is the
index of the measurement that first found an early bird. By default the measurements are the
calls to ``update()``. A call that fails (a bad probe, a changed model) raises and leaves the
detector as it was.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast._probe import CodeSet, Probe, check_probe, first_batch, model_device, record_codes
from koopfast._spline_layers import BatchNorm, traced_spline_layers
from koopfast.masks import global_topk

__all__ = [
    "EarlyBird",
    "MaskDistanceEarlyBird",
    "MaskPreset",
    "SplineEarlyBird",
    "SplinePreset",
    "add_bn_l1_subgradient",
]

SplinePreset = Literal["koopfast", "spline_eb"]
MaskPreset = Literal["koopfast", "early_bird_tickets"]

# The BatchNorm classes each released code selects with isinstance.
_SPLINE_EB_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)  # Spline-EB ConvNet/experiments.py, set_global_hooks
_EB_TICKETS_BATCHNORMS = (nn.BatchNorm2d,)  # Early-Bird-Tickets main.py, EarlyBird.pruning


def _check_preset(preset: object, allowed: tuple[str, ...], fn: str) -> None:
    if not isinstance(preset, str) or preset not in allowed:
        raise ValueError(f"{fn}: expected preset to be one of {list(allowed)}, got {preset!r}")


def _float32(x: float) -> float:
    """x rounded to float32, as a Python float (exact)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _bn_scale(bn: nn.Module) -> Tensor:
    """A BatchNorm's affine scale (the mask-distance detector takes only BatchNorms that have one)."""
    weight = bn.weight
    assert isinstance(weight, Tensor), "a BatchNorm with an affine scale"
    return weight


def _bn_channels(bn: nn.Module) -> int:
    channels = bn.num_features
    assert isinstance(channels, int), "a BatchNorm's num_features is an int"
    return channels


# What a detector keeps per measured epoch: region codes (spline) or a channel mask (mask distance).
_State = TypeVar("_State")


class EarlyBird(ABC, Generic[_State]):
    """Common state of the detectors: build them with :meth:`spline` or :meth:`mask_distance`.

    Attributes:
        history: per measurement, the largest distance of the newest epoch to the previous
            ``window`` epochs (None while fewer than ``window`` epochs came before).
        distances: per measurement, the distances to each of the previous ``window`` epochs,
            oldest first (empty while fewer came before).
        epoch: index of the measurement that first found an early bird, or None.
    """

    _fn = "koopfast.EarlyBird"

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
        self._kept: deque[_State] = deque(maxlen=window)

    @staticmethod
    def spline(
        model: nn.Module,
        probe: Probe,
        *,
        window: int | None = None,
        eps: float | None = None,
        modules: Sequence[str] | None = None,
        preset: SplinePreset = "koopfast",
    ) -> SplineEarlyBird:
        """The spline (region code) detector; see :class:`SplineEarlyBird`."""
        return SplineEarlyBird(model, probe, window=window, eps=eps, modules=modules, preset=preset)

    @staticmethod
    def mask_distance(
        model: nn.Module,
        prune_ratio: float,
        *,
        window: int | None = None,
        eps: float | None = None,
        preset: MaskPreset = "koopfast",
    ) -> MaskDistanceEarlyBird:
        """The BatchNorm channel-mask detector; see :class:`MaskDistanceEarlyBird`."""
        return MaskDistanceEarlyBird(model, prune_ratio, window=window, eps=eps, preset=preset)

    @property
    def detected(self) -> bool:
        return self.epoch is not None

    @property
    def updates(self) -> int:
        """The number of measurements (history entries): the ``update()`` calls, plus the one at
        construction with ``preset="early_bird_tickets"``."""
        return len(self.history)

    def update(self) -> bool:
        """Measures the model now (call once per epoch) and compares it with the kept epochs.
        Returns whether an early bird has been found, at this call or before."""
        state = self._measure()
        if len(self._kept) == self.window:
            dists = self._distances(state, list(self._kept))
            largest = max(dists)
            if self.epoch is None and self._settled(largest):
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
    def _settled(self, largest: float) -> bool:
        """Whether the largest distance to the kept epochs makes an early bird."""

    @abstractmethod
    def _measure(self) -> _State:
        """The model's state now (codes or a mask), kept on its device."""

    @abstractmethod
    def _distances(self, state: _State, previous: list[_State]) -> list[float]:
        """The distance of `state` to each of `previous`, oldest first."""

    @abstractmethod
    def _state_bytes(self, state: _State) -> int:
        """Memory held by one kept state."""


class SplineEarlyBird(EarlyBird[dict[str, CodeSet]]):
    """Spline early-bird detection on region codes (use :meth:`EarlyBird.spline`).

    Args:
        model: the network being trained.
        probe: fixed input data, a batch tensor or a re-iterable of batches (tuples ``(x, ...)``
            allowed), run in eval mode at every ``update()``. The authors use a 2-D grid of
            mixtures of two images (10,000 points); any fixed set of inputs works.
        window: how many previous epochs the newest is compared with (default 3).
        eps: early bird when the largest of those distances is below eps (default 0.16).
        modules: names of the modules whose outputs are coded. Default: every BatchNorm; for a
            model without BatchNorm, the pre-activations of its hidden linear and convolutional
            layers. Not with ``preset="spline_eb"``, which codes what the authors code.
        preset: ``"koopfast"`` or ``"spline_eb"``.

    ``preset="spline_eb"`` reproduces GATECH-EIC/Spline-EB (files under ``ConvNet/``):

    - coded modules: every ``nn.BatchNorm1d`` and ``nn.BatchNorm2d`` (isinstance), their outputs,
      in eval mode without gradients (``experiments.py``: ``set_global_hooks``, ``detect_eb``);
      a model without one is refused (their average divides by zero);
    - code and per-layer distance: ``output > 0``; the number of differing values over all values
      of the layer, in float32: ``fl32(count) / fl32(values)`` (``vis_util.py``: ``getDiff``);
    - distance between two epochs: the per-layer distances summed in float32 in the order the
      BatchNorms run, divided by the number of layers in float32 (``detect_eb``); a BatchNorm
      that runs twice in one forward pass is refused (their hooks index layers by call count and
      fail), and so is one that never runs (theirs averages over those that ran);
    - window 3 and eps 0.16 (``detect_eb``'s ``lookback`` and ``thres``): the newest epoch is
      compared with each of the previous 3 and found when their largest distance, a float32, is
      below fl32(0.16) (a float32 comparison);
    - when: ``detect_eb`` runs after each epoch's training, with the epoch index from 0
      (``EB_experiment``), as ``update()`` does; ``epoch`` is the index they print and name the
      checkpoint ``EB_{epoch}.pth.tar`` with. (They stop measuring after a detection; ``update()``
      goes on, which changes nothing before it.)

    Their probe is one batch; in eval mode a BatchNorm treats each sample alone, so the codes do
    not depend on how the probe is batched here. The counts are exact, so the preset is
    bit-identical to their code while each layer has
    fewer than 2**24 coded values (probe samples x channels x positions); above that their float32
    sum of ones rounds, in an order that depends on torch's reduction. The default differs in
    three ways: it codes every ``_BatchNorm`` (BatchNorm3d and SyncBatchNorm too) or, without
    BatchNorm, the traced pre-activations, so that it runs on more models; it computes in float64
    with exact counts (per-layer distances averaged in float64: about (L + 1) * 2**-24 relative from
    the preset's to first order, L coded layers, so only a distance that close to eps can decide
    differently; tests/parity allows (L + 2) * 2**-24); and it compares with eps in float64.
    """

    _fn = "koopfast.EarlyBird.spline"

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        *,
        window: int | None = None,
        eps: float | None = None,
        modules: Sequence[str] | None = None,
        preset: SplinePreset = "koopfast",
    ):
        fn = self._fn
        _check_preset(preset, ("koopfast", "spline_eb"), fn)
        super().__init__(3 if window is None else window, 0.16 if eps is None else eps)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
        check_probe(probe, fn=fn)
        named = dict(model.named_modules())
        if preset == "spline_eb":
            if modules is not None:
                raise ValueError(
                    f"{fn}: expected modules=None with preset='spline_eb' (it codes every BatchNorm1d/2d, "
                    f"as Spline-EB does), got {modules!r}"
                )
            targets: dict[str, nn.Module] = {n: m for n, m in named.items() if isinstance(m, _SPLINE_EB_BATCHNORMS)}
            if not targets:
                raise ValueError(
                    f"{fn}: expected a model with BatchNorm1d/BatchNorm2d layers for preset='spline_eb', "
                    f"got {type(model).__name__} without any"
                )
        elif modules is not None:
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
        self.preset = preset
        self.modules = list(targets)
        self._targets = targets
        self._eps32 = _float32(self.eps)

    def codes(self) -> dict[str, CodeSet]:
        """The region codes of the model now, per coded module."""
        return record_codes(self.model, self._targets, self.probe, fn=self._fn)

    def _settled(self, largest: float) -> bool:
        return largest < (self._eps32 if self.preset == "spline_eb" else self.eps)

    def _measure(self) -> dict[str, CodeSet]:
        """The codes now; with preset="spline_eb" in the order the modules run (that of their sum)."""
        calls: list[str] = []
        state = record_codes(self.model, self._targets, self.probe, fn=self._fn, calls=calls)
        order = list(dict.fromkeys(calls))
        if self.preset == "spline_eb" and calls != order * (len(calls) // len(order)):
            raise ValueError(
                f"{self._fn}: expected each BatchNorm to run once per forward pass, in one order for every probe "
                f"batch, with preset='spline_eb' (Spline-EB's hooks index layers by call count), got the runs "
                f"{calls[: 2 * len(order)]}"
            )
        if self._kept:
            for name, before in self._kept[-1].items():
                now = state[name]
                if now.codes.shape != before.codes.shape or now.bits != before.bits:
                    raise ValueError(
                        f"{self._fn}: expected the codes of {name!r} to keep their shape between epochs "
                        f"({list(before.codes.shape)}, {before.bits} bits per unit), got {list(now.codes.shape)}, "
                        f"{now.bits} bits: did the model or the probe change?"
                    )
        return {n: state[n] for n in order} if self.preset == "spline_eb" else state

    def _distances(self, state: dict[str, CodeSet], previous: list[dict[str, CodeSet]]) -> list[float]:
        names = self.modules
        codes = state
        a = [codes[n].codes for _ in previous for n in names]
        b = [p[n].codes for p in previous for n in names]
        per_unit = ops.hamming_distance(a, b)  # one call for all layers and epochs
        counts = torch.stack([d.sum() for d in per_unit]).cpu().view(len(previous), len(names))
        sizes = torch.tensor([codes[n].units * codes[n].bits for n in names], dtype=torch.int64)
        if self.preset == "spline_eb":
            return _spline_eb_average(counts, sizes, [names.index(n) for n in state])
        per_layer = counts.double() / sizes.double().clamp_min(1)
        return per_layer.mean(1).tolist()

    def _state_bytes(self, state: dict[str, CodeSet]) -> int:
        return sum(c.codes.numel() * c.codes.element_size() for c in state.values())


def _spline_eb_average(counts: Tensor, sizes: Tensor, order: list[int]) -> list[float]:
    """Spline-EB's float32 arithmetic on exact counts [previous, layers]: each layer's
    fl32(count) / fl32(values), summed in run order, divided by the number of layers."""
    per_layer = counts.float() / sizes.float()  # IEEE division, correctly rounded, as theirs on the CPU
    total = per_layer[:, order[0]].clone()
    for j in order[1:]:
        total = total + per_layer[:, j]  # one rounding per addition, in their order
    total = total / torch.tensor(float(len(order)), dtype=torch.float32)
    return total.double().tolist()


class MaskDistanceEarlyBird(EarlyBird[Tensor]):
    """Early-bird detection from BatchNorm channel masks (use :meth:`EarlyBird.mask_distance`).

    Args:
        model: the network being trained (with BatchNorm layers that have affine scales).
        prune_ratio: the fraction of channels the mask prunes, in [0, 1): the channels with the
            smallest |gamma| over all BatchNorm layers together.
        window: how many previous masks the newest is compared with (default 4: the authors keep 5).
        eps: early bird when every one of those distances is at most eps (default 0.1).
        preset: ``"koopfast"`` or ``"early_bird_tickets"``.

    ``preset="early_bird_tickets"`` reproduces GATECH-EIC/Early-Bird-Tickets (``main.py``, class
    ``EarlyBird`` and the training loop; ``main_lp.py`` and ``main_resnet50.py`` hold the same class):

    - channels: the scales of every ``nn.BatchNorm2d`` (isinstance: BatchNorm1d layers are left
      out), in ``model.modules()`` order; a model without one is refused (their code fails);
    - mask: |gamma| copied into a buffer of torch's default dtype (float32 unless changed) and
      sorted; the threshold is the sorted value at index ``int(channels * prune_ratio)``; a channel
      is kept iff its |gamma|, in the model's dtype, is strictly greater. Every channel tied with the
      threshold is pruned, so ties prune more: the initial weights (every gamma 1) give a mask that
      keeps nothing. Distinct values keep ``channels - int(channels * prune_ratio) - 1``;
    - distance: ``1 - same / channels`` in float64, ``same`` the number of equal mask entries;
    - window: the last 5 masks (``epoch_keep``); the newest is compared with each of the other 4,
      and an early bird is found when none of the distances exceeds 0.1 (``<= 0.1``);
    - when: their detector runs at the start of each epoch, before its training, so its first
      mask is that of the initial weights; the preset measures the model once when it is built
      (measurement 0: build it before training starts) and then at each ``update()``, called after
      each epoch's training as for the default. The masks seen are theirs, and ``epoch`` is the
      number of epochs trained when the early bird is found: the epoch their log prints ("Find
      EB!!!!!!!!!, epoch: {epoch}"); their checkpoint ``EB-{30,50,70}-{epoch + 1}.pth.tar``
      stores ``epoch + 1``, which their retraining script takes as ``--start-epoch``. (Their loop
      never measures the weights after the last epoch; ``update()`` after it adds one measurement
      and changes nothing before.)

    The default differs on purpose: every ``_BatchNorm`` counts (BatchNorm1d in MLPs too); the
    mask keeps exactly ``round((1 - prune_ratio) * channels)`` channels (kf.masks.global_topk,
    ties by position: a tie never empties the mask); the distance is ``differing / channels``; the
    first measurement is the first ``update()``, so ``epoch`` is the index of that call: one less
    than the epochs trained, and one less than the preset's epoch on the same run.
    """

    _fn = "koopfast.EarlyBird.mask_distance"

    def __init__(
        self,
        model: nn.Module,
        prune_ratio: float,
        *,
        window: int | None = None,
        eps: float | None = None,
        preset: MaskPreset = "koopfast",
    ):
        fn = self._fn
        _check_preset(preset, ("koopfast", "early_bird_tickets"), fn)
        super().__init__(4 if window is None else window, 0.1 if eps is None else eps)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
        kinds, what = (_EB_TICKETS_BATCHNORMS, "BatchNorm2d") if preset != "koopfast" else (BatchNorm, "BatchNorm")
        bns = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
        if not bns:
            raise ValueError(
                f"{fn}: expected a model with {what} layers"
                + (" (Early-Bird-Tickets masks BatchNorm2d channels only)" if preset != "koopfast" else "")
                + f", got {type(model).__name__} without any"
            )
        no_scale = [n for n, m in bns.items() if m.weight is None]
        if no_scale:
            raise ValueError(f"{fn}: expected BatchNorm layers with affine scales, got affine=False in {no_scale}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"{fn}: expected prune_ratio in [0, 1), got {prune_ratio!r}")
        self.model = model
        self.prune_ratio = float(prune_ratio)
        self.preset = preset
        self._bns = bns
        self._channels = sum(_bn_channels(m) for m in bns.values())
        if preset == "early_bird_tickets":
            self.update()  # measurement 0: the weights before the first epoch's training

    def masks(self) -> dict[str, Tensor]:
        """The channel masks of the model now: ``dict[BatchNorm name -> bool Tensor[channels]]``,
        True = kept."""
        scales = {n: _bn_scale(m).detach() for n, m in self._bns.items()}
        if self.preset == "early_bird_tickets":
            return _threshold_masks(scales, self.prune_ratio, fn=self._fn)
        return global_topk(scales, self.prune_ratio, by="abs")

    def _settled(self, largest: float) -> bool:
        return largest <= self.eps

    def _measure(self) -> Tensor:
        mask = torch.cat([m.reshape(-1) for m in self.masks().values()])
        return ops.sign_codes(mask.view(1, -1), 0)  # one unit of N bits: [1, ceil(N / 64)]

    def _distances(self, state: Tensor, previous: list[Tensor]) -> list[float]:
        n = self._channels
        differing = torch.cat(ops.hamming_distance([state] * len(previous), previous)).tolist()
        if self.preset == "early_bird_tickets":
            return [1 - (n - d) / n for d in differing]  # their 1 - same / n, rounding included
        return [d / max(n, 1) for d in differing]

    def _state_bytes(self, state: Tensor) -> int:
        return state.numel() * state.element_size()


def _threshold_masks(scales: dict[str, Tensor], prune_ratio: float, *, fn: str) -> dict[str, Tensor]:
    """Early-Bird-Tickets' channel masks: |gamma| > the sorted value at int(channels * ratio) of the
    |gamma| rounded to torch's default dtype (their buffer); ties with the threshold are pruned."""
    magnitudes = {n: s.abs() for n, s in scales.items()}
    buffer = torch.cat([m.reshape(-1).to(torch.get_default_dtype()) for m in magnitudes.values()])
    index = int(buffer.numel() * prune_ratio)
    if index >= buffer.numel():
        raise ValueError(
            f"{fn}: expected prune_ratio * channels below the number of channels ({buffer.numel()}), "
            f"got {prune_ratio!r} (Early-Bird-Tickets would index past its sorted scales)"
        )
    threshold = torch.sort(buffer).values[index]
    return {n: m > threshold for n, m in magnitudes.items()}  # torch promotion, as their weight.gt(thre)


def add_bn_l1_subgradient(model: nn.Module, strength: float = 1e-4, *, preset: MaskPreset = "koopfast") -> None:
    """Adds ``strength * sign(gamma)`` to the gradient of every BatchNorm scale: the L1 penalty on
    BatchNorm scales (network slimming) that You et al. train with before drawing channel masks.
    Call after ``loss.backward()`` and before ``optimizer.step()``.

    ``preset="early_bird_tickets"`` penalizes the ``nn.BatchNorm2d`` scales only, as their
    ``updateBN`` (Early-Bird-Tickets ``main.py``, Spline-EB ``ConvNet/EB_utils.py``) does, with
    their ``--s`` default 1e-4; the default penalizes every BatchNorm with a scale and a gradient."""
    fn = "koopfast.earlybird.add_bn_l1_subgradient"
    _check_preset(preset, ("koopfast", "early_bird_tickets"), fn)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"{fn}: expected a finite strength, got {strength!r}")
    kinds = _EB_TICKETS_BATCHNORMS if preset == "early_bird_tickets" else BatchNorm
    for m in model.modules():
        weight = m.weight if isinstance(m, kinds) else None
        if isinstance(weight, Tensor) and weight.grad is not None:  # a BatchNorm's scale is a tensor or None
            weight.grad.add_(torch.sign(weight.detach()), alpha=strength)
