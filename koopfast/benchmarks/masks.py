"""Masks: fused application, global pruning, and what a masked model costs per forward and step.

Three comparisons, each against what a PyTorch user writes today:

- apply: zeroing the pruned entries of 200 tensors (10^8 elements in all; or parameters,
  gradients and two Adam states of 2.5·10^7 parameters each) with koopfast's one fused pass
  against a Python loop of ``p.mul_(mask)`` and ``torch._foreach_mul_``. Inputs are restored
  before every run, so every method finds nonzero pruned entries.
- global: ``koopfast.prune.global_unstructured`` against ``torch.nn.utils.prune.global_unstructured``
  (L1, 90 %) on a stack of Linear layers, time and peak extra memory; and koopfast's lean way
  (``global_topk`` + ``Masked``). Each run starts from an unpruned copy of the model.
- overhead: a forward pass and a training step (forward, backward, SGD with momentum; AdamW, its
  default loop and fused=True) of
  a model pruned with torch.nn.utils.prune's forward pre-hooks, of the same model under
  ``koopfast.masks.Masked`` (one fused gradient pass; and forced to re-mask after every step as
  well, what optimizers outside ``kf.masks.ZERO_PRESERVING`` get), and of the dense model, timed in
  turn (one step of each per round) so that a noisy machine slows them alike; notes give the
  overhead over dense by median and by minimum. Next to them, ``torch.sqrt`` of a dense second
  moment and of one with the exact zeros of 90 % pruned entries (what AdamW's default loop takes
  the root of every step).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

import koopfast as kf
from koopfast._torch_compat import foreach_copy_, foreach_mul_
from koopfast.benchmarks.harness import (
    Row,
    fill_ratios,
    peak_extra_bytes,
    row_of,
    time_fn,
    time_interleaved,
)
from koopfast.benchmarks.select import model_like

APPLY_BASELINE = "loop p.mul_(mask)"
APPLY_STREAM = "stream read+write (foreach x*1)"
GLOBAL_BASELINE = "torch prune.global_unstructured"
OVERHEAD_BASELINE = "torch.nn.utils.prune (hooks)"


# ---- apply ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyCase:
    n: int  # parameters
    groups: int = 1  # 1: parameters only; 4: parameters, gradients, Adam exp_avg and exp_avg_sq
    tensors: int = 200
    sparsity: float = 0.9
    seed: int = 0

    @property
    def name(self) -> str:
        what = "params" if self.groups == 1 else "params+grads+2 Adam states"
        return f"apply {what}: {self.groups * self.n:.0e} elements in {self.groups * self.tensors} tensors"


def apply_inputs(case: ApplyCase, device: torch.device):
    params = model_like(case.n, case.tensors, torch.float32, device, case.seed)
    masks = kf.masks.global_topk(params, case.sparsity, by="abs")
    groups = [params] + [[torch.randn_like(p) for p in params] for _ in range(case.groups - 1)]
    targets = [t for g in groups for t in g]
    pristine = [t.clone() for t in targets]
    return targets, pristine, masks


def apply_methods(case: ApplyCase, targets: list[Tensor], masks: list[Tensor]) -> dict[str, tuple[Callable, int]]:
    """name -> (fn, bytes moved)."""
    n_all = case.groups * case.n
    index = [i % case.tensors for i in range(len(targets))]
    packed = kf.ops.pack_masks(masks)
    all_masks = [masks[i] for i in index]
    float_masks = [m.float() for m in all_masks]
    rw = 8 * n_all  # read and write every element once
    return {
        APPLY_BASELINE: (lambda: [t.mul_(m) for t, m in zip(targets, all_masks)], rw + n_all),
        "torch._foreach_mul_ (bool masks)": (lambda: foreach_mul_(targets, all_masks), rw + n_all),
        "torch._foreach_mul_ (float masks)": (lambda: foreach_mul_(targets, float_masks), rw + 4 * n_all),
        "koopfast apply_masks (bool)": (lambda: kf.ops.apply_masks(targets, masks, index), rw + case.n),
        "koopfast apply_masks (packed)": (lambda: kf.ops.apply_masks(targets, packed, index), rw + case.n // 8),
        APPLY_STREAM: (lambda: foreach_mul_(targets, 1.0), rw),
    }


def check_apply(targets, pristine, masks, fns, case: ApplyCase) -> None:
    """Every method leaves the same tensors (pruned entries zero, kept ones untouched) before timing."""
    expected = [torch.where(masks[i % case.tensors], p, 0) for i, p in enumerate(pristine)]
    for name, (fn, _) in fns.items():
        if name == APPLY_STREAM:
            continue
        restore(targets, pristine)
        fn()
        assert all(torch.equal(t, e) for t, e in zip(targets, expected)), name
    restore(targets, pristine)


def restore(targets: list[Tensor], pristine: list[Tensor]) -> None:
    foreach_copy_(targets, pristine)


def apply_cases(quick: bool, large: bool = False) -> Iterator[ApplyCase]:
    n = 10**6 if quick else 10**9 if large else 10**8
    yield ApplyCase(n=n)
    yield ApplyCase(n=n // 4, groups=4)


def run_apply(
    device: torch.device, *, quick: bool = False, repeat: int | None = None, large: bool = False
) -> list[Row]:
    rows: list[Row] = []
    for case in apply_cases(quick, large):
        rows += _apply_case(case, device, repeat)
    return fill_ratios(rows, APPLY_BASELINE, APPLY_STREAM)


def _apply_case(case: ApplyCase, device: torch.device, repeat: int | None) -> list[Row]:
    targets, pristine, masks = apply_inputs(case, device)
    fns = apply_methods(case, targets, masks)
    check_apply(targets, pristine, masks, fns, case)
    index = [i % case.tensors for i in range(len(targets))]
    packed = kf.ops.pack_masks(masks)
    # The same kernel on tensors whose pruned entries are still zero (parameters after a
    # masked-gradient step): blocks are read, not written back.
    fns["koopfast re-apply, already zero (packed)"] = (
        lambda: kf.ops.apply_masks(targets, packed, index),
        4 * case.groups * case.n + case.n // 8,
    )
    rows = []
    for method, (fn, moved) in fns.items():
        reapply = method.startswith("koopfast re-apply")
        t = time_fn(fn, device, repeat=repeat or 7, setup=None if reapply else lambda: restore(targets, pristine))
        restore(targets, pristine)
        peak = peak_extra_bytes(fn, device)
        rows.append(_row("apply", case.name, method, case.groups * case.n, device, t, moved, peak))
    return rows


# ---- global_unstructured -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalCase:
    layers: int
    width: int
    amount: float = 0.9
    seed: int = 0

    @property
    def n(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @property
    def name(self) -> str:
        return f"global_unstructured L1 {self.amount:.0%}: {self.n:.2e} params in {self.layers} Linear"


def linear_stack(layers: int, width: int, seed: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)


def _pairs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in model for name in ("weight", "bias")]


def global_methods(case: GlobalCase, holder: dict) -> dict[str, Callable[[], object]]:
    """Each prunes holder['model'] (a fresh unpruned copy made by the setup)."""

    def torch_global():
        torch_prune.global_unstructured(_pairs(holder["model"]), torch_prune.L1Unstructured, amount=case.amount)

    def koopfast_global():
        kf.prune.global_unstructured(_pairs(holder["model"]), torch_prune.L1Unstructured, amount=case.amount)

    def koopfast_lean():
        model = holder["model"]
        masks = kf.masks.global_topk(dict(model.named_parameters()), case.amount, by="abs")
        holder["masked"] = kf.masks.Masked(model, masks)

    return {
        GLOBAL_BASELINE: torch_global,
        "koopfast.prune.global_unstructured": koopfast_global,
        "koopfast lean: global_topk + Masked": koopfast_lean,
    }


def _torch_state_masks(model: nn.Module) -> list[Tensor]:
    return [getattr(m, f"{name}_mask") != 0 for m, name in _pairs(model)]


def check_global(case: GlobalCase, pristine: nn.Module, holder: dict, fns) -> None:
    """The same masks: identical away from the threshold value; the same number pruned overall."""
    results = {}
    for name, fn in fns.items():
        holder["model"] = copy.deepcopy(pristine)
        fn()
        if "lean" in name:
            results[name] = [m.unpack() for m in holder.pop("masked").masks.values()]
        else:
            results[name] = _torch_state_masks(holder["model"])
    weights = [getattr(m, name).detach().abs() for m, name in _pairs(pristine)]
    torch_masks = results[GLOBAL_BASELINE]
    kept = sum(int(m.sum()) for m in torch_masks)
    threshold = min(float(w[m].min()) for w, m in zip(weights, torch_masks) if m.any())
    for name, masks in results.items():
        assert sum(int(m.sum()) for m in masks) == kept, name
        for w, m, ref in zip(weights, masks, torch_masks):
            away = w != threshold
            assert torch.equal(m[away], ref[away]), name
    assert all(
        torch.equal(a, b)
        for a, b in zip(results["koopfast.prune.global_unstructured"], results["koopfast lean: global_topk + Masked"])
    )
    holder.clear()


def global_cases(quick: bool) -> Iterator[GlobalCase]:
    yield GlobalCase(layers=4, width=512) if quick else GlobalCase(layers=12, width=2048)


def run_global(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for case in global_cases(quick):
        rows += _global_case(case, device, quick, repeat)
    return fill_ratios(rows, GLOBAL_BASELINE)


def _global_case(case: GlobalCase, device: torch.device, quick: bool, repeat: int | None) -> list[Row]:
    pristine = linear_stack(case.layers, case.width, case.seed, device)
    holder: dict = {}
    fns = global_methods(case, holder)
    check_global(case, pristine, holder, fns)

    def setup():
        holder.clear()
        holder["model"] = copy.deepcopy(pristine)

    rows = []
    for method, fn in fns.items():
        slow = method == GLOBAL_BASELINE and not quick
        t = time_fn(fn, device, repeat=repeat or (3 if slow else 5), warmup=0 if slow else 1, setup=setup)
        setup()
        peak = peak_extra_bytes(fn, device)
        rows.append(_row("global", case.name, method, case.n, device, t, 4 * case.n, peak))
        holder.clear()
    return rows


# ---- forward and training-step overhead -------------------------------------------------------------

DENSE = "dense model (no masks)"
MASKED = "koopfast Masked"
MASKED_TWO_PASSES = "koopfast Masked, re-mask after step (remask_after_step=True)"
OPTIMIZERS: dict[str, Callable] = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01),
    # torch's fused CPU kernel: its own vectorized math, where the default loop's torch.sqrt runs
    # ~6x slower on the exact zeros of a pruned entry's second moment (bench/RESULTS.md, issue 15)
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=True),
}


@dataclass(frozen=True)
class OverheadCase:
    layers: int
    width: int
    batch: int
    train: bool
    optimizer: str = "SGD momentum"
    sparsity: float = 0.9
    seed: int = 0

    @property
    def n(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @property
    def name(self) -> str:
        what = f"train step (fwd+bwd+{self.optimizer})" if self.train else "forward (no_grad)"
        return f"{what}: {self.n:.2e} params, batch {self.batch}"


def overhead_models(
    case: OverheadCase, device: torch.device
) -> tuple[dict[str, tuple[nn.Module, torch.optim.Optimizer]], dict[str, Tensor]]:
    """(method -> (model, optimizer), the masks): copies of one model with the same masks.

    Masked (one fused gradient pass per step for SGD/AdamW: kf.masks.ZERO_PRESERVING), Masked
    forced to re-mask parameters and states after every step as well (what any other optimizer
    gets), torch.nn.utils.prune's hooks (weight = weight_orig * mask before every forward, the
    gradient multiplied by the mask in backward), and the dense model.
    """
    dense = linear_stack(case.layers, case.width, case.seed, device)
    masks = kf.masks.global_topk(dict(dense.named_parameters()), case.sparsity, by="abs")
    make_opt = OPTIMIZERS[case.optimizer]
    out: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {DENSE: (dense, make_opt(dense.parameters()))}
    for method, remask in ((MASKED, None), (MASKED_TWO_PASSES, True)):
        model = copy.deepcopy(dense)
        opt = make_opt(model.parameters())
        kf.masks.Masked(model, masks, opt, remask_after_step=remask)
        out[method] = (model, opt)
    pruned = copy.deepcopy(dense)
    for name, mask in masks.items():
        layer, attr = name.split(".")
        torch_prune.custom_from_mask(pruned[int(layer)], attr, mask)
    out[OVERHEAD_BASELINE] = (pruned, make_opt(pruned.parameters()))  # weight_orig: new parameters
    return out, masks


def overhead_methods(case: OverheadCase, models, x: Tensor) -> dict[str, Callable[[], object]]:
    def forward(model):
        with torch.no_grad():
            return model(x)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    methods = (
        [DENSE, MASKED, MASKED_TWO_PASSES, OVERHEAD_BASELINE] if case.train else [DENSE, MASKED, OVERHEAD_BASELINE]
    )
    if case.train:
        return {m: (lambda m=m: step(*models[m])) for m in methods}
    return {m: (lambda m=m: forward(models[m][0])) for m in methods}


def overhead_cases(quick: bool) -> Iterator[OverheadCase]:
    layers, width, batch = (4, 512, 16) if quick else (12, 2048, 32)
    yield OverheadCase(layers, width, batch, train=False)
    for optimizer in OPTIMIZERS:
        yield OverheadCase(layers, width, batch, train=True, optimizer=optimizer)


def run_overhead(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for case in overhead_cases(quick):
        rows += _overhead_case(case, device, repeat)
    rows = fill_ratios(rows, OVERHEAD_BASELINE)
    for r in rows:
        dense = next(x for x in rows if x.case == r.case and x.method == DENSE)
        r.extra["overhead_vs_dense"] = r.median_ms / dense.median_ms - 1
        r.extra["overhead_vs_dense_min"] = r.min_ms / dense.min_ms - 1
        r.note = (
            f"{100 * r.extra['overhead_vs_dense']:+.0f}% vs dense (median), "
            f"{100 * r.extra['overhead_vs_dense_min']:+.0f}% (min)"
        )
    return rows


def _overhead_case(case: OverheadCase, device: torch.device, repeat: int | None) -> list[Row]:
    models, masks = overhead_models(case, device)
    x = torch.randn(case.batch, case.width, device=device)
    fns = overhead_methods(case, models, x)
    if not case.train:  # the masked and the pruned model compute the same function
        torch.testing.assert_close(fns[MASKED](), fns[OVERHEAD_BASELINE](), rtol=1e-5, atol=1e-6)
    timings = time_interleaved(fns, device, repeat or 9)
    rows = []
    for method, fn in fns.items():
        peak = peak_extra_bytes(fn, device)
        rows.append(_row("overhead", case.name, method, case.n, device, timings[method], 0, peak))
    if case.train:  # still exactly zero after the timed steps, with or without the second pass
        for method in (MASKED, MASKED_TWO_PASSES):
            for name, p in models[method][0].named_parameters():
                assert bool((p[~masks[name]] == 0).all()), (method, name)
    return rows


# ---- storage ------------------------------------------------------------------------------------------


def storage_sizes(n: int = 10**7, tensors: int = 200, sparsity: float = 0.9) -> dict[str, int]:
    """Bytes on disk of the same masks: torch.save of float32 and bool masks, kf.masks.save."""
    xs = model_like(n, tensors, torch.float32, torch.device("cpu"), 0)
    masks = {f"t{i}": m for i, m in enumerate(kf.masks.global_topk(xs, sparsity, by="abs"))}
    sizes = {}
    for name, save in [
        ("torch.save float32 masks", lambda f: torch.save({k: m.float() for k, m in masks.items()}, f)),
        ("torch.save bool masks", lambda f: torch.save(masks, f)),
        ("kf.masks.save (bit-packed)", lambda f: kf.masks.save(masks, f)),
    ]:
        buffer = io.BytesIO()
        save(buffer)
        sizes[name] = buffer.getbuffer().nbytes
    buffer.seek(0)
    loaded = kf.masks.load(buffer)
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    return sizes


# ---- shared ---------------------------------------------------------------------------------------------


def _row(family, case, method, n, device, t, moved, peak) -> Row:
    return row_of(t, peak, family=f"masks/{family}", case=case, method=method, n=n, device=device, bytes_moved=moved)


SQRT_CASE = "torch.sqrt of an Adam second moment"
SQRT_DENSE = "torch.sqrt, dense"


def run_sqrt_of_zeros(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    """torch.sqrt over a second moment without and with the exact zeros of 90 % pruned entries:
    the part of AdamW's default step that a pruned model makes slower, whatever keeps it pruned."""
    n = 10**6 if quick else 4 * 10**6
    g = torch.Generator().manual_seed(0)
    dense = (torch.rand(n, generator=g) * 1e-6).to(device)
    zeros = dense * (torch.rand(n, generator=g) < 0.1).to(device)
    fns = {SQRT_DENSE: lambda: torch.sqrt(dense), "torch.sqrt, 90 % exact zeros": lambda: torch.sqrt(zeros)}
    timings = time_interleaved(fns, device, repeat or 15)
    rows = [_row("sqrt", SQRT_CASE, m, n, device, timings[m], 2 * n * 4, None) for m in fns]
    return fill_ratios(rows, SQRT_DENSE)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None, large: bool = False) -> list[Row]:
    return (
        run_apply(device, quick=quick, repeat=repeat, large=large)
        + run_global(device, quick=quick, repeat=repeat)
        + run_overhead(device, quick=quick, repeat=repeat)
        + run_sqrt_of_zeros(device, quick=quick, repeat=repeat)
    )


def summary(rows: list[Row]) -> str:
    """The notes of the rows that carry one, and the size of the same masks on disk."""
    lines = [f"  {r.case.split(':')[0]}, {r.method}: {r.note}" for r in rows if r.note]
    n = max((r.n for r in rows if r.case.startswith("apply")), default=10**6)
    sizes = storage_sizes(min(n, 10**7))
    reference = sizes["torch.save float32 masks"]
    lines.append("masks on disk (the same masks, 90 % sparsity):")
    lines += [
        f"  {name:<28} {size / 2**20:9.2f} MiB  {100 * size / reference:6.2f} % of float32"
        for name, size in sizes.items()
    ]
    return "\n".join(lines)
