"""Region codes: koopfast's packed codes against torch bool comparisons and the authors' float copies.

Sizes are those of a VGG-16 with BatchNorm on CIFAR (32 x 32 inputs): 13 BatchNorm2d outputs
(64, 64 channels at 32 x 32; 128, 128 at 16 x 16; 3 x 256 at 8 x 8; 3 x 512 at 4 x 4; 3 x 512 at
2 x 2) and the classifier's BatchNorm1d(512), over a probe batch of B images: 276,992 values per
image. Values are Gaussian with a per-channel shift (BatchNorm outputs), and each kept epoch is
the current one with 10 % of its values perturbed, so distances are realistic, not 0 or 1/2.

Three cases, each checked across methods before timing:

- ``epoch``: one update of the spline early-bird detector, given this epoch's BatchNorm outputs
  and the codes of the previous W = 3 epochs: make this epoch's codes and its distance to each
  kept epoch (normalized Hamming per layer, averaged over layers). koopfast: ``sign_codes`` per
  layer, one ``hamming_distance`` call. torch bool: ``x > 0`` per layer, ``(now != before).sum()``.
  Authors (Spline-EB): a float copy of every output (``.cpu()`` + deepcopy), then per pair
  ``((a > 0).float() - (b > 0).float()).abs().sum() / numel``.
- ``distance``: the comparison alone (the codes or masks of all W + 1 epochs given).
- ``unit pairs``: all-pairs unit distances within one layer over the probe (spline redundancy's
  Hamming measure): ``pairwise_hamming`` against a loop of bool comparisons, and against the
  float matrix-product identity d = b (1 - b)^T + (1 - b) b^T (the fastest torch way).

Memory: ``peak extra MB`` is what one call needs beyond its inputs (outputs included); the bytes
that a detector keeps per epoch (codes, bool masks or float copies) are in ``extra`` and in the
notes of each row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, peak_extra_bytes, time_fn

# (channels, spatial side) of every BatchNorm output of a CIFAR VGG-16 (side 1: the BatchNorm1d)
VGG16_BN: tuple[tuple[int, int], ...] = (
    (64, 32), (64, 32), (128, 16), (128, 16), (256, 8), (256, 8), (256, 8),
    (512, 4), (512, 4), (512, 4), (512, 2), (512, 2), (512, 2), (512, 1),
)  # fmt: skip
WINDOW = 3

KOOPFAST = "koopfast (packed codes)"
BOOL = "torch bool (x > 0)"
FLOAT = "authors (float copies)"
MATMUL = "torch float matmul"
STREAM = "stream read (sum)"


@dataclass(frozen=True)
class CodesCase:
    kind: str  # "epoch", "distance" or "unit pairs"
    batch: int  # probe images
    layer: int = 0  # "unit pairs": index into VGG16_BN
    seed: int = 0

    @property
    def name(self) -> str:
        if self.kind == "unit pairs":
            c, s = VGG16_BN[self.layer]
            return f"unit pairs {c} ch @ {s}x{s}, B={self.batch}"
        return f"{self.kind} VGG-16 B={self.batch} W={WINDOW}"

    @property
    def values(self) -> int:
        layers = [VGG16_BN[self.layer]] if self.kind == "unit pairs" else VGG16_BN
        return self.batch * sum(c * s * s for c, s in layers)


def bn_outputs(batch: int, seed: int, layers=VGG16_BN) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, s in layers:
        shift = torch.randn(1, c, *([1, 1] if s > 1 else []), generator=g) * 0.5
        shape = (batch, c, s, s) if s > 1 else (batch, c)
        out.append(torch.randn(shape, generator=g) + shift)
    return out


def perturbed(acts: list[Tensor], seed: int, fraction: float = 0.1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.where(torch.rand(a.shape, generator=g) < fraction, torch.randn(a.shape, generator=g), a) for a in acts
    ]


# ---- the three ways of keeping and comparing epochs -----------------------------------------------------


def koopfast_codes(acts: list[Tensor]) -> list[Tensor]:
    return [kf.ops.sign_codes(a, 1) for a in acts]


def koopfast_distances(now: list[Tensor], kept: list[list[Tensor]], sizes: Tensor) -> list[float]:
    per_unit = kf.ops.hamming_distance([c for _ in kept for c in now], [c for k in kept for c in k])
    totals = torch.stack([d.sum() for d in per_unit]).double().view(len(kept), len(now))
    return (totals / sizes).mean(1).tolist()


def bool_codes(acts: list[Tensor]) -> list[Tensor]:
    return [a > 0 for a in acts]


def bool_distances(now: list[Tensor], kept: list[list[Tensor]]) -> list[float]:
    return [sum(float((a != b).sum()) / a.numel() for a, b in zip(now, k)) / len(now) for k in kept]


def float_copies(acts: list[Tensor]) -> list[Tensor]:
    return copy.deepcopy([a.detach().cpu() for a in acts])  # Spline-EB: output.detach().cpu(), then deepcopy


def float_distances(now: list[Tensor], kept: list[list[Tensor]]) -> list[float]:
    def diff(a, b):  # Spline-EB's getDiff
        return float(torch.abs((a > 0).type(torch.FloatTensor) - (b > 0).type(torch.FloatTensor)).sum() / a.numel())

    return [sum(diff(a, b) for a, b in zip(now, k)) / len(now) for k in kept]


def sizes_of(acts: list[Tensor]) -> Tensor:
    return torch.tensor([a.numel() for a in acts], dtype=torch.float64)


def bool_pairs_loop(bits: Tensor) -> Tensor:
    return torch.stack([(bits[i] != bits).sum(1) for i in range(bits.shape[0])])


def float_pairs(bits: Tensor) -> Tensor:
    f = bits.float()
    return (f @ (1 - f).t() + (1 - f) @ f.t()).round().long()


def unit_bits(act: Tensor) -> Tensor:
    return (act > 0).transpose(0, 1).reshape(act.shape[1], -1)


# ---- cases -------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    case: CodesCase
    fns: dict[str, Callable[[], object]]
    kept_bytes: dict[str, int]  # bytes a detector keeps per epoch, by method
    bytes_moved: int


def prepare(case: CodesCase, device: torch.device) -> Prepared:
    if case.kind == "unit pairs":
        (act,) = bn_outputs(case.batch, case.seed, [VGG16_BN[case.layer]])
        act = act.to(device)
        bits = unit_bits(act)
        codes = kf.ops.sign_codes(act, 1)
        fns = {
            KOOPFAST: lambda: kf.ops.pairwise_hamming(codes),
            BOOL: lambda: bool_pairs_loop(bits),
            MATMUL: lambda: float_pairs(bits),
        }
        return Prepared(case, fns, {}, codes.numel() * 8)

    acts = [a.to(device) for a in bn_outputs(case.batch, case.seed)]
    history = [perturbed(acts, case.seed + 1 + i) for i in range(WINDOW)]
    sizes = sizes_of(acts)
    kept_codes = [koopfast_codes(h) for h in history]
    kept_bools = [bool_codes(h) for h in history]
    kept_floats = [float_copies(h) for h in history]
    kept_bytes = {
        KOOPFAST: sum(c.numel() * 8 for c in kept_codes[0]),
        BOOL: sum(b.numel() for b in kept_bools[0]),
        FLOAT: sum(f.numel() * 4 for f in kept_floats[0]),
    }
    n = sum(a.numel() for a in acts)
    if case.kind == "epoch":
        fns = {
            KOOPFAST: lambda: koopfast_distances(koopfast_codes(acts), kept_codes, sizes),
            BOOL: lambda: bool_distances(bool_codes(acts), kept_bools),
            FLOAT: lambda: float_distances(float_copies(acts), kept_floats),
            STREAM: lambda: [a.sum() for a in acts],
        }
        moved = n * acts[0].element_size() + WINDOW * kept_bytes[KOOPFAST]
    else:
        now_codes, now_bools, now_floats = koopfast_codes(acts), bool_codes(acts), float_copies(acts)
        fns = {
            KOOPFAST: lambda: koopfast_distances(now_codes, kept_codes, sizes),
            BOOL: lambda: bool_distances(now_bools, kept_bools),
            FLOAT: lambda: float_distances(now_floats, kept_floats),
        }
        moved = 2 * WINDOW * kept_bytes[KOOPFAST]
    return Prepared(case, fns, kept_bytes, moved)


def check(prepared: Prepared) -> None:
    """Every method's answer agrees before anything is timed."""
    fns = prepared.fns
    if prepared.case.kind == "unit pairs":
        expected = fns[MATMUL]().cpu()
        assert torch.equal(fns[KOOPFAST]().cpu(), expected)
        assert torch.equal(fns[BOOL]().cpu(), expected)
        return
    exact = fns[BOOL]()
    assert all(abs(k - e) < 1e-12 for k, e in zip(fns[KOOPFAST](), exact))  # the same counts; fp64 sums
    assert all(abs(f - e) < 1e-6 for f, e in zip(fns[FLOAT](), exact))  # the authors sum in float32
    assert all(0.02 < e < 0.2 for e in exact), exact  # realistic distances


def cases(quick: bool) -> Iterator[CodesCase]:
    # 128 images: every layer's bits per unit fill whole 64-bit words (2 x 2 maps: 512 bits), so
    # packed codes are exactly 1/8 of bool masks; other batch sizes pad each unit's bits to a word.
    batch = 8 if quick else 128
    yield CodesCase("epoch", batch)
    yield CodesCase("distance", batch)
    for layer in (0, 4, 10):  # 64 ch @ 32x32, 256 ch @ 8x8, 512 ch @ 2x2
        yield CodesCase("unit pairs", batch, layer)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for case in cases(quick):
        prepared = prepare(case, device)
        check(prepared)
        for method, fn in prepared.fns.items():
            slow = method in (BOOL, FLOAT) and case.kind != "distance"
            t = time_fn(fn, device, repeat=repeat or (3 if slow else 7))
            peak = peak_extra_bytes(fn, device)
            kept = prepared.kept_bytes.get(method)
            rows.append(
                Row(
                    family="codes",
                    case=case.name,
                    method=method,
                    n=case.values,
                    device=device.type,
                    median_ms=t.median_s * 1e3,
                    min_ms=t.min_s * 1e3,
                    bytes_moved=prepared.bytes_moved,
                    peak_extra_mb=None if peak is None else peak / 2**20,
                    note="" if kept is None else f"keeps {kept / 2**20:.1f} MB per epoch",
                    extra={"kept_bytes_per_epoch": kept},
                )
            )
        del prepared
    return fill_ratios(rows, BOOL, STREAM)  # ratios against torch bool comparisons, the yardstick


def summary(rows: list[Row]) -> str:
    """What a detector keeps per epoch with each method, and the ratio to torch bool masks."""
    lines = ["case                         method                     kept per epoch MB  vs torch bool"]
    for case in dict.fromkeys(r.case for r in rows):
        kept = {r.method: r.extra.get("kept_bytes_per_epoch") for r in rows if r.case == case}
        if not kept.get(BOOL):
            continue
        for method in (KOOPFAST, BOOL, FLOAT):
            b = kept[method]
            lines.append(f"{case:27s}  {method:25s}  {b / 2**20:17.2f}  {kept[BOOL] / b:12.1f}x")
    return "\n".join(lines)
