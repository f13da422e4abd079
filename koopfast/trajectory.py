"""TrajectoryRecorder: a model's parameter trajectory, one snapshot per call, with its Gram matrix.

Snapshots live in one [capacity, N] buffer (float32, bfloat16 or float16; on the parameters'
device or in host memory). Each ``record()`` writes the current parameters into a row and, in the
same pass, takes the float64 inner products of the new snapshot with the stored ones, so the
Gram matrix G = WᵀW of the trajectory is always up to date without another pass (papers.md,
"Everything is Y·c"). With an anchor, rows hold deltas θ_t − a (a = the first snapshot, in
float32), which keeps the small differences between snapshots that low-precision storage of θ_t
itself would lose (numerics.md, pitfall 3); the Gram matrix is still that of the full θ_t.

The snapshot store's public interface is all that DMD and the Koopman criteria use: ``len``
and time order (0 = oldest kept), ``gram``, ``combine`` (Σ_t c_t θ_t), ``dots`` (⟨θ_t, v⟩),
``blocks`` (column blocks of W, float64), ``unflatten``, ``layout``, ``dtype`` and
``storage_epsilon``. How rows are kept (ring slots, a file, deltas against an anchor) is private
to this module: changing it means editing this file only.

Across processes (``process_group``, or DTensor parameters sharded ``Shard(0)`` as FSDP2 does):
each process stores the snapshots of its own parameters (or shards) only, and each ``record()``
sums the new Gram row over the processes with one all-reduce of t + 3 float64 numbers (the
dots, the self and anchor dots, a NaN flag). The Gram matrix, and so everything the DMD derives
from it, is the same on every process; modes and scores are computed locally, one pass over the
local snapshots each. docs/distributed.md has the communication volumes.
"""

from __future__ import annotations

import fcntl
import math
import operator
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from koopfast import _distributed as kd
from koopfast import ops
from koopfast._reduce import sq_norm as _sq_norm
from koopfast.prunable import ParamSource, named_tensors

__all__ = ["TrajectoryRecorder"]

_FN = "koopfast.TrajectoryRecorder"
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_VERSION = 1

AnchorMode = Literal["auto", "none", "first"]
# What an anchor argument resolves to: "given" is a dict of tensors passed by the caller.
ResolvedAnchor = Literal["none", "first", "given"]


class TrajectoryRecorder:
    """Records snapshots of named parameters into a fixed-capacity buffer.

    Args:
        model_or_named_params: a model (its prunable tensors are recorded: linear, convolutional and
            attention-projection weights and biases, as in the Koopman pruning paper's code; see
            :mod:`koopfast.prunable`), a dict of named tensors, or (name, tensor) pairs. All on one
            device.
        capacity: snapshots the buffer holds (memory: capacity × N × element size).
        dtype: storage dtype: torch.float32 (default), torch.bfloat16 or torch.float16.
        device: where the buffer lives: None for the parameters' device, or "cpu" to keep
            snapshots in host memory while the parameters are on a GPU.
        anchor: "auto" (default: deltas against the first snapshot when the storage dtype is
            narrower than float32, full snapshots otherwise), "first", "none", or a dict name ->
            tensor giving the anchor (for example the initial weights).
        window: if True, keep the last ``capacity`` snapshots (a ring); if False, ``record()``
            on a full recorder raises.
        path: keep the snapshots in a memory-mapped file at this path instead of memory (the
            buffer must be on the CPU): trajectories larger than RAM, streamed back chunk by
            chunk by the Gram, DMD and score passes. The file is created (or emptied) and sized
            (capacity + 1) × N × element size; "{rank}" in the path is replaced by the process's
            rank. The Gram matrix and the bookkeeping stay in memory.
        process_group: a ``torch.distributed`` group (or "default") when each process records its
            own part of the parameters (a partition of the named parameters); not needed for
            DTensor parameters (detected: each process records its local shards) nor for
            replicated ones (DDP: every process records the same). Every process of the group
            must call ``record()`` together.

    ``record()`` raises ValueError, leaving the recorder exactly as it was, if a parameter changed
    shape, dtype or device, or holds NaN/Inf (or a value the storage dtype cannot represent).
    On a GPU, that check reads one number back per call (a synchronization).
    """

    def __init__(
        self,
        model_or_named_params: ParamSource,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        anchor: AnchorMode | Mapping[str, Tensor] = "auto",
        window: bool = False,
        path: str | os.PathLike[str] | None = None,
        process_group: Any = None,
    ) -> None:
        self._params = named_tensors(model_or_named_params, fn=_FN)
        self._layout = kd.resolve(list(self._params.values()), process_group, _FN)
        # With DTensor parameters, results (scores, modes, fixed points) come back as DTensors
        # placed like them; the recorder itself works on the local shards.
        self._like = tuple(self._params.values()) if self._layout is not None and self._layout.sharded else None
        # A model is asked for its parameters again at every record(): modules may replace their
        # parameter objects (load_state_dict(assign=True), to_empty(), ...).
        self._model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
        try:
            capacity = operator.index(capacity)
        except TypeError:
            raise TypeError(f"{_FN}: expected capacity to be an int, got {type(capacity).__name__}") from None
        if isinstance(capacity, bool) or capacity < 2:
            raise ValueError(f"{_FN}: expected capacity >= 2 (DMD needs two snapshots), got {capacity}")
        if dtype not in _STORAGE_DTYPES:
            raise TypeError(f"{_FN}: expected dtype to be float32, bfloat16 or float16, got {dtype}")
        if not isinstance(window, bool):
            raise TypeError(f"{_FN}: expected window to be a bool, got {type(window).__name__}")
        tensors = [kd.local(p) for p in self._params.values()]
        self._param_device = tensors[0].device
        for name, p in self._params.items():
            if not p.is_floating_point():
                raise TypeError(f"{_FN}: expected floating-point parameters, got {name!r} of dtype {p.dtype}")
            if p.is_meta:
                raise ValueError(
                    f"{_FN}: expected parameters that hold values, got {name!r} on the meta device (materialize the "
                    "model first, e.g. to_empty() and an initialization)"
                )
            if p.device != self._param_device:
                raise ValueError(
                    f"{_FN}: expected all parameters on one device, got {tensors[0].device} and {p.device} ({name!r})"
                )
        self.names: tuple[str, ...] = tuple(self._params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in tensors)
        self._param_dtypes = tuple(p.dtype for p in tensors)
        self._numels = tuple(p.numel() for p in tensors)
        self._offsets = tuple(sum(self._numels[:i]) for i in range(len(tensors)))
        self.numel = sum(self._numels)  # of this process's parameters (its shards)
        if self.numel == 0:
            raise ValueError(f"{_FN}: expected parameters with at least one element, got only empty tensors")
        self.capacity = capacity
        self.dtype = dtype
        self.window = window
        self.device = torch.device(device) if device is not None else self._param_device
        if path is not None and self.device.type != "cpu":
            raise ValueError(f"{_FN}: expected the buffer on the CPU (device='cpu') with path, got {self.device}")

        self._anchor_mode: ResolvedAnchor
        self._anchor_mode, self._anchor = self._resolve_anchor(anchor)
        # One row more than the capacity: each record() writes into a free row, in the same pass
        # as its dot products, so a record() that fails on a non-finite value loses nothing.
        self._rows = capacity + 1
        self.path = None if path is None else os.fspath(path).replace("{rank}", str(self.rank))
        element = torch.empty((), dtype=dtype).element_size()
        need = self._rows * self.numel * element + (self._rows + 1) * self._rows * 8
        try:
            self._snapshots = self._allocate()
            # Gram of the stored rows in slot coordinates, their inner products with the anchor, and
            # the anchor's squared norm: G_ij = |a|^2 + <a, d_i> + <a, d_j> + <d_i, d_j>.
            self._row_dots = torch.zeros(self._rows, self._rows, dtype=torch.float64, device=self.device)
            self._anchor_dots = torch.zeros(self._rows, dtype=torch.float64, device=self.device)
        except (RuntimeError, MemoryError, OverflowError, TypeError) as exc:  # TypeError: sizes beyond int64
            raise ValueError(
                f"{_FN}: expected a capacity whose buffers fit in memory, got capacity {capacity}: "
                f"{need / 2**30:.3g} GiB on {self.device} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            ) from None
        self._anchor_sq = 0.0 if self._anchor is None else self._global_sq_norm(self._anchor)
        self._order: list[int] = []  # slots in time order
        self.steps = 0  # successful record() calls, evicted snapshots included

    # ---- recording ------------------------------------------------------------------------------------

    def record(self) -> None:
        """Stores one snapshot of the parameters (call after each optimizer step)."""
        self._check_file(f"{_FN}.record")
        self._check_unchanged()
        full = len(self._order) == self.capacity
        if full and not self.window:
            raise ValueError(
                f"{_FN}.record: the recorder is full ({self.capacity} snapshots); create it with window=True to keep "
                "the last snapshots, or a larger capacity"
            )
        used = set(self._order)
        slot = next(r for r in range(self._rows) if r not in used)
        kept = self._order[1:] if full else list(self._order)
        anchor = self._anchor
        if self._anchor_mode == "first" and anchor is None:
            anchor = self._flat_params().to(device=self.device, dtype=torch.float32).contiguous()
        with torch.no_grad():
            dots, status = ops.trajectory_ingest(self._ingest_inputs(), self._snapshots, slot, kept, anchor)
        bad = int(status[0])
        if self._layout is not None:
            dots, others_bad = self._reduce_row(dots, bad >= 0)
            if bad < 0 and others_bad:
                raise ValueError(
                    f"{_FN}.record: expected finite parameters on every process, got NaN/Inf on another process "
                    f"(this is rank {self.rank}); nothing was recorded"
                )
        if bad >= 0:
            raise ValueError(f"{_FN}.record: {self._nonfinite_message(bad)}; nothing was recorded")
        if anchor is not None and anchor is not self._anchor:  # None only while self._anchor is None
            self._anchor, self._anchor_sq = anchor, self._global_sq_norm(anchor)
        idx = torch.tensor(kept, dtype=torch.long, device=self.device)
        self._row_dots[slot].zero_()
        self._row_dots[:, slot] = 0
        self._row_dots[slot, idx] = dots[: len(kept)]
        self._row_dots[idx, slot] = dots[: len(kept)]
        self._row_dots[slot, slot] = dots[len(kept) + ops.INGEST_SELF_DOT]
        self._anchor_dots[slot] = dots[len(kept) + ops.INGEST_ANCHOR_DOT]
        self._order = [*kept, slot]
        self.steps += 1

    def __len__(self) -> int:
        return len(self._order)

    @property
    def gram(self) -> Tensor:
        """(t × t) float64 Gram matrix of the stored snapshots in time order, on the CPU."""
        idx = torch.tensor(self._order, dtype=torch.long, device=self.device)
        g = self._row_dots[idx][:, idx]
        if self._anchor is not None:
            p = self._anchor_dots[idx]
            g = g + (self._anchor_sq + p[:, None] + p[None, :])
        return g.cpu()

    def snapshot(self, t: int) -> dict[str, Tensor]:
        """The stored snapshot at time index t (0 = oldest kept; negative from the end), as float32
        tensors in parameter shapes (rounded as stored)."""
        n = len(self._order)
        if not -n <= t < n:
            raise IndexError(f"{_FN}.snapshot: expected t in [{-n}, {n}), got {t}")
        self._check_file(f"{_FN}.snapshot")
        coeffs = torch.zeros(self._rows, 1, dtype=torch.float64, device=self.device)
        coeffs[self._order[t], 0] = 1.0
        return self.unflatten(ops.trajectory_combine(self._snapshots, coeffs, self._anchor)[0])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of a flat [N] tensor in parameter shapes, keyed by name (DTensors placed like the
        parameters, for DTensor parameters)."""
        out = {
            name: flat[off : off + n].view(shape)
            for name, off, n, shape in zip(self.names, self._offsets, self._numels, self.shapes)
        }
        if self._like is not None and self._layout is not None:  # _like is set only with a layout
            out = {name: self._layout.wrap(t, like) for (name, t), like in zip(out.items(), self._like)}
        return out

    def blocks(self, size: int = 1 << 16) -> Iterator[Tensor]:
        """The stored snapshots as float64 column blocks in time order: ``[t, n]`` slices of the
        ``[t, N]`` trajectory (the anchor added back), n ≤ ``size``, from the first parameter to the
        last. One block in memory at a time: passes over the trajectory cost ``t · size`` doubles of
        memory, whatever N is (the snapshots may be on disk, ``path=``)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{_FN}.blocks: expected a positive int size, got {size!r}")
        self._check_file(f"{_FN}.blocks")
        order = torch.tensor(self._order, dtype=torch.long, device=self.device)
        for n0 in range(0, self.numel, size):
            block = self._snapshots[order, n0 : n0 + size].to(torch.float64)
            if self._anchor is not None:
                block += self._anchor[n0 : n0 + size].to(torch.float64)
            yield block

    @property
    def layout(self) -> kd.Layout | None:
        """How the parameters are spread across processes (None on one process): DMD reduces its
        small factors over this layout."""
        return self._layout

    @property
    def rank(self) -> int:
        """This process's rank in the recorder's group (0 without one)."""
        return 0 if self._layout is None else self._layout.rank

    # ---- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume recording exactly: the stored snapshots in time order, their
        Gram bookkeeping, the anchor and the step count (tensors on the recorder's device)."""
        self._check_file(f"{_FN}.state_dict")
        idx = torch.tensor(self._order, dtype=torch.long, device=self.device)
        return {
            "version": _STATE_VERSION,
            **self._configuration(),
            "anchor": self._anchor,
            "anchor_sq": self._anchor_sq,
            "snapshots": self._snapshots[idx],
            "row_dots": self._row_dots[idx][:, idx],
            "anchor_dots": self._anchor_dots[idx],
            "steps": self.steps,
        }

    def _configuration(self) -> dict[str, Any]:
        """What a state must share with the recorder that loads it (as built, not as recorded)."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "capacity": self.capacity,
            "dtype": str(self.dtype),
            "window": self.window,
            "anchor_mode": self._anchor_mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`; the recorder must record the same parameters
        with the same capacity, dtype, window and anchor mode. Everything is validated before
        anything changes (types, shapes, dtypes, finite values, a step count no smaller than the
        snapshots held, each snapshot's squared norm against its Gram entry): a rejected state
        leaves the recorder exactly as it was."""
        fn = f"{_FN}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: expected a state dict (a mapping), got {type(state).__name__}")
        keys = ("version", "names", "shapes", "capacity", "dtype", "window", "anchor_mode", "anchor", "anchor_sq",
                "snapshots", "row_dots", "anchor_dots", "steps")  # fmt: skip
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"{fn}: expected a state from TrajectoryRecorder.state_dict(), missing {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"{fn}: expected a state of version {_STATE_VERSION}, got {state['version']!r}")
        for key, want in self._configuration().items():
            if state[key] != want:
                raise ValueError(f"{fn}: expected {key} {want!r} (as this recorder was built), got {state[key]!r}")
        snapshots = state["snapshots"]
        t = snapshots.shape[0] if isinstance(snapshots, Tensor) and snapshots.dim() == 2 else -1
        if not 0 <= t <= self.capacity:
            got = list(snapshots.shape) if isinstance(snapshots, Tensor) else type(snapshots).__name__
            raise ValueError(f"{fn}: expected snapshots [t, {self.numel}] with t <= {self.capacity}, got {got}")
        tensors = {
            "snapshots": ((t, self.numel), self.dtype),
            "row_dots": ((t, t), torch.float64),
            "anchor_dots": ((t,), torch.float64),
        }
        for key, (shape, dtype) in tensors.items():
            v = state[key]
            if not isinstance(v, Tensor) or tuple(v.shape) != shape or v.dtype != dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{fn}: expected {key} of shape {shape} and dtype {dtype}, got {got}")
            if v.is_meta:
                raise ValueError(f"{fn}: expected {key} to hold values, got a tensor on the meta device")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{fn}: expected finite {key}, got NaN or Inf")
        anchor = state["anchor"]
        if anchor is not None:
            if not isinstance(anchor, Tensor) or tuple(anchor.shape) != (self.numel,) or anchor.dtype != torch.float32:
                got = f"{tuple(anchor.shape)} {anchor.dtype}" if isinstance(anchor, Tensor) else type(anchor).__name__
                raise ValueError(f"{fn}: expected anchor None or a float32 tensor of shape ({self.numel},), got {got}")
            if anchor.is_meta or not bool(torch.isfinite(anchor).all()):
                raise ValueError(f"{fn}: expected a finite anchor with values, got NaN, Inf or a meta tensor")
        needs_anchor = self._anchor_mode == "given" or (self._anchor_mode == "first" and t > 0)
        if needs_anchor and anchor is None:
            raise ValueError(f"{fn}: expected an anchor in the state (anchor mode {self._anchor_mode!r}), got None")
        if self._anchor_mode == "none" and anchor is not None:
            raise ValueError(f"{fn}: expected no anchor (anchor mode 'none'), got one")
        anchor_sq = state["anchor_sq"]
        if isinstance(anchor_sq, bool) or not isinstance(anchor_sq, (int, float)) or not math.isfinite(anchor_sq):
            raise ValueError(f"{fn}: expected anchor_sq to be a finite number, got {anchor_sq!r}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < t:
            raise ValueError(f"{fn}: expected steps to be an int >= the {t} snapshots held, got {steps!r}")
        # The Gram entries belong to these snapshots: each diagonal entry is its row's squared norm.
        norms = torch.tensor([_sq_norm(row) for row in snapshots], dtype=torch.float64)
        diagonal = state["row_dots"].diagonal().cpu()
        if not torch.allclose(norms, diagonal, rtol=1e-9, atol=0.0):
            raise ValueError(f"{fn}: expected row_dots to be the snapshots' Gram matrix, but its diagonal differs")
        self._check_file(fn)
        self._snapshots[:t] = snapshots.to(self.device)
        self._row_dots.zero_()
        self._row_dots[:t, :t] = state["row_dots"].to(self.device)
        self._anchor_dots.zero_()
        self._anchor_dots[:t] = state["anchor_dots"].to(self.device)
        self._anchor = None if anchor is None else anchor.to(device=self.device, dtype=torch.float32).clone()
        self._anchor_sq = float(anchor_sq)
        self._order = list(range(t))
        self.steps = steps

    # ---- the snapshot store: everything DMD and the Koopman criteria read --------------------------
    # Time order (0 = oldest kept) is the only order these methods expose: how rows are laid out in
    # the buffer (slots of a ring, a file, deltas against an anchor) stays inside this module.

    def combine(self, coeffs: Tensor, *, wide: bool = False) -> Tensor:
        """Weighted sums of the stored snapshots: ``out[j] = Σ_t coeffs[t, j] θ_t`` (time order,
        the anchor added back), one pass over the buffer, accumulated in float64.

        Args:
            coeffs: [t, m] float64 or complex128 (t = ``len(self)``), on any device.
            wide: float64/complex128 output instead of float32/complex64.

        Returns:
            [m, N] on the buffer's device (this process's parameters only, across processes).
        """
        fn = f"{_FN}.combine"
        coeffs = self._checked_coeffs(coeffs, fn)
        self._check_file(fn)
        return ops.trajectory_combine(self._snapshots, self._slot_coeffs(coeffs), self._anchor, wide)

    def dots(self, vectors: Tensor) -> Tensor:
        """Inner products ``<θ_t, v_j>`` of every stored snapshot with every row of ``vectors``
        ([m, N] float32/float64 on the buffer's device), accumulated in float64: [t, m] in time
        order, on the buffer's device (this process's part of the sum, across processes)."""
        fn = f"{_FN}.dots"
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != self.numel:
            got = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"{fn}: expected vectors of shape [m, {self.numel}], got {got}")
        self._check_file(fn)
        out = ops.trajectory_dots(self._snapshots, vectors, self._anchor)
        order = torch.tensor(self._order, dtype=torch.long, device=out.device)
        rows = out[order]
        if self._anchor is not None:  # the last row is <anchor, v>: the stored rows are deltas
            rows = rows + out[-1]
        return rows

    @property
    def storage_epsilon(self) -> float:
        """Relative rounding of the stored trajectory: the storage dtype's epsilon, scaled by the
        size of what is stored (deltas are small next to θ), plus that of the parameters' dtype.
        Directions of the trajectory whose singular values lie below ``storage_epsilon · σ₁`` are
        at the level of this rounding."""
        g = self.gram
        total = float(torch.trace(g))
        idx = torch.tensor(self._order, dtype=torch.long, device=self.device)
        stored = float(torch.trace(self._row_dots[idx][:, idx]))
        ratio = math.sqrt(stored / total) if total > 0 else 1.0
        param_eps = max(torch.finfo(d).eps for d in self._param_dtypes)
        return torch.finfo(self.dtype).eps * ratio + param_eps

    def _slot_coeffs(self, coeffs_by_time: Tensor) -> Tensor:
        """[t, m] coefficients in time order -> [rows, m] in slot order (zeros elsewhere)."""
        out = torch.zeros(self._rows, coeffs_by_time.shape[1], dtype=coeffs_by_time.dtype, device=self.device)
        out[torch.tensor(self._order, dtype=torch.long, device=self.device)] = coeffs_by_time.to(self.device)
        return out

    def _checked_coeffs(self, coeffs: Tensor, fn: str) -> Tensor:
        t = len(self._order)
        if not isinstance(coeffs, Tensor) or coeffs.dim() != 2 or coeffs.shape[0] != t:
            got = tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__
            raise ValueError(f"{fn}: expected coeffs of shape [{t}, m] (one row per stored snapshot), got {got}")
        if coeffs.dtype not in (torch.float64, torch.complex128):
            raise TypeError(f"{fn}: expected float64 or complex128 coeffs, got {coeffs.dtype}")
        return coeffs

    # ---- checks ---------------------------------------------------------------------------------------

    def _resolve_anchor(self, anchor: AnchorMode | Mapping[str, Tensor]) -> tuple[ResolvedAnchor, Tensor | None]:
        if isinstance(anchor, Mapping):
            missing = [n for n in self.names if n not in anchor]
            if missing:
                raise ValueError(f"{_FN}: expected the anchor to give every recorded parameter, missing {missing[:3]}")
            pieces = {n: kd.local(anchor[n].detach()) for n in self.names}  # DTensors: this process's shard
            for name, shape in zip(self.names, self.shapes):
                if tuple(pieces[name].shape) != tuple(shape):
                    raise ValueError(
                        f"{_FN}: expected anchor {name!r} of shape {tuple(shape)}, got {tuple(pieces[name].shape)}"
                    )
            flat = torch.cat([pieces[n].reshape(-1).to(torch.float32) for n in self.names])
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"{_FN}: expected a finite anchor")
            return "given", flat.to(self.device).contiguous()
        if anchor not in ("auto", "none", "first"):
            raise ValueError(f"{_FN}: expected anchor 'auto', 'none', 'first' or a dict of tensors, got {anchor!r}")
        if anchor == "auto":
            return ("first" if self.dtype != torch.float32 else "none"), None
        return ("first" if anchor == "first" else "none"), None

    def _check_unchanged(self) -> None:
        if self._model is not None and not self._same_parameter_objects():
            current = named_tensors(self._model, fn=f"{_FN}.record")
            if tuple(current) != self.names:
                raise ValueError(
                    f"{_FN}.record: the model's prunable parameters changed from {list(self.names)[:4]}... to "
                    f"{list(current)[:4]}..."
                )
            self._params = current
        for name, param, shape, dtype in zip(self.names, self._params.values(), self.shapes, self._param_dtypes):
            p = kd.local(param)
            if p.shape != shape:
                raise ValueError(
                    f"{_FN}.record: parameter {name!r} changed shape from {tuple(shape)} to {tuple(p.shape)}"
                )
            if p.dtype != dtype:
                raise ValueError(f"{_FN}.record: parameter {name!r} changed dtype from {dtype} to {p.dtype}")
            if p.device != self._param_device:
                raise ValueError(f"{_FN}.record: parameter {name!r} moved from {self._param_device} to {p.device}")

    def _same_parameter_objects(self) -> bool:
        """Whether every recorded name still holds the very tensor recorded so far: then the model's
        choice of tensors is not read again (a walk over every module, milliseconds per step for
        a transformer); a replaced parameter (``load_state_dict(assign=True)``, ``to_empty()``)
        makes the next record() read it."""
        assert self._model is not None, "called only for a recorder built from a model"
        modules = dict(self._model.named_modules())
        for name, param in self._params.items():
            prefix, _, attr = name.rpartition(".")
            module = modules.get(prefix)
            if module is None or getattr(module, attr, None) is not param:
                return False
        return True

    def _flat_params(self) -> Tensor:
        return torch.cat([kd.local(p.detach()).reshape(-1).to(torch.float32) for p in self._params.values()])

    def _allocate(self) -> Tensor:
        self._file = None
        if self.path is None:  # rows are read only after they are written: no need to touch the pages
            return torch.empty(self._rows, self.numel, dtype=self.dtype, device=self.device)
        # The file is locked for as long as this recorder lives (another recorder given the same path
        # fails here instead of sharing it), then emptied and sized: sparse, zero-filled.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(
                f"{_FN}: expected a snapshot file of its own, but {self.path!r} is locked by another recorder"
            ) from None
        self._file = os.fdopen(fd, "r+b")
        self._file_bytes = self._rows * self.numel * torch.empty((), dtype=self.dtype).element_size()
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self._file_bytes)
        flat = torch.from_file(self.path, shared=True, size=self._rows * self.numel, dtype=self.dtype)
        return flat.view(self._rows, self.numel)

    def _check_file(self, fn: str) -> None:
        """A snapshot file shortened on disk would kill the process (SIGBUS) at the first read of
        the lost pages: checked before every pass over the snapshots."""
        if self._file is None:
            return
        size = os.fstat(self._file.fileno()).st_size
        if size < self._file_bytes:
            raise ValueError(
                f"{fn}: expected the snapshot file {self.path!r} to hold {self._file_bytes} bytes, but it has "
                f"{size}: it was truncated on disk, and its snapshots are lost"
            )

    def _reduce_row(self, dots: Tensor, bad: bool) -> tuple[Tensor, bool]:
        """The Gram row summed over the processes, and whether any other process failed."""
        row = torch.cat([dots.to(torch.float64), torch.tensor([float(bad)], dtype=torch.float64, device=dots.device)])
        row = kd.all_reduce(row.to(kd.comm_device(self._layout)), self._layout).to(dots.device)
        return row[:-1], float(row[-1]) > float(bad)

    def _global_sq_norm(self, flat: Tensor) -> float:
        sq = torch.tensor([_sq_norm(flat)], dtype=torch.float64, device=kd.comm_device(self._layout))
        return float(kd.all_reduce(sq, self._layout))

    def _ingest_inputs(self) -> list[Tensor]:
        local = [kd.local(p.detach()) for p in self._params.values()]
        if self.device == self._param_device:
            return local
        # Parameters on another device than the buffer: stage them where the buffer is.
        return [torch.cat([p.reshape(-1) for p in local]).to(self.device)]

    def _nonfinite_message(self, index: int) -> str:
        if self.device == self._param_device:
            name = self.names[index]
        else:  # one staged tensor: find the parameter
            name = next(n for n, p in self._params.items() if not bool(torch.isfinite(kd.local(p.detach())).all()))
        return f"expected finite parameters, got NaN/Inf (or a value beyond {self.dtype}'s range) in {name!r}"
