"""trajectory_ingest / trajectory_combine / trajectory_dots against their reference twins."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import reference

STORAGE = [torch.float32, torch.bfloat16, torch.float16]
INGEST_CHUNK = 1 << 18  # csrc/trajectory/trajectory.h


def make_params(device, gen, sizes=((30, 7), (5,), (13, 11)), dtypes=None):
    params = [torch.randn(s, generator=gen).to(device) for s in sizes]
    if dtypes:
        params = [p.to(d) for p, d in zip(params, dtypes)]
    return params


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("anchored", [False, True])
def test_ingest_matches_reference(device, storage, anchored):
    gen = torch.Generator().manual_seed(1)
    params = make_params(device, gen, dtypes=[torch.float32, torch.bfloat16, torch.float64])
    params[2] = params[2].t()  # strided
    n = sum(p.numel() for p in params)
    anchor = (torch.randn(n, generator=gen) * 0.5).to(device) if anchored else None
    snaps = torch.randn(5, n, generator=gen).to(device=device, dtype=storage)
    expected = snaps.clone()
    dots, status = kf.ops.trajectory_ingest(params, snaps, 3, [0, 4, 1], anchor)
    ref_dots, ref_status = reference.trajectory_ingest(params, expected, 3, [0, 4, 1], anchor)
    assert status.tolist() == ref_status.tolist() == [-1]
    assert torch.equal(snaps, expected), "the written row must equal round(θ - anchor) exactly"
    assert dots.dtype == torch.float64 and rel(dots, ref_dots) < 1e-13


def test_ingest_chunk_boundaries_and_empty_params(device):
    gen = torch.Generator().manual_seed(2)
    params = [
        torch.randn(INGEST_CHUNK + 1, generator=gen).to(device),
        torch.randn(0, 3).to(device),
        torch.randn(INGEST_CHUNK - 1, generator=gen).to(device),
    ]
    n = sum(p.numel() for p in params)
    snaps = torch.randn(3, n, generator=gen).to(device)
    expected = snaps.clone()
    dots, _ = kf.ops.trajectory_ingest(params, snaps, 0, [1, 2], None)
    ref_dots, _ = reference.trajectory_ingest(params, expected, 0, [1, 2], None)
    assert torch.equal(snaps, expected) and rel(dots, ref_dots) < 1e-13


@pytest.mark.parametrize(
    ("bad", "storage"),
    [(float("nan"), torch.float32), (float("inf"), torch.float32), (7e4, torch.float16)],
    ids=["nan", "inf", "beyond-float16"],
)
def test_ingest_reports_nonfinite_values_and_touches_no_other_row(device, bad, storage):
    params = [torch.ones(4, device=device), torch.ones(3, device=device)]
    params[1][1] = bad
    snaps = torch.full((3, 7), 0.25, device=device, dtype=storage)
    dots, status = kf.ops.trajectory_ingest(params, snaps, 0, [1], None)
    assert int(status[0]) == 1
    assert bool((snaps[1:] == 0.25).all()) and bool((dots == 0).all())  # row 0 is unspecified


def test_ingest_is_independent_of_the_thread_count():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(3 * INGEST_CHUNK + 17, generator=gen)]
    snaps = torch.randn(4, params[0].numel(), generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(kf.ops.trajectory_ingest(params, snaps.clone(), 0, [1, 2, 3], None)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results), "bit-identical sums whatever the threads"


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_combine_matches_reference(device, storage, anchored, kind):
    gen = torch.Generator().manual_seed(4)
    n = 4096 * 2 + 77
    snaps = torch.randn(6, n, generator=gen).to(device=device, dtype=storage)
    anchor = torch.randn(n, generator=gen).to(device) if anchored else None
    dtype = torch.float64 if kind == "real" else torch.complex128
    coeffs = torch.randn(6, 3, generator=gen, dtype=dtype).to(device)
    coeffs[2] = 0  # a row nobody reads
    for wide in (False, True):
        out = kf.ops.trajectory_combine(snaps, coeffs, anchor, wide)
        ref = reference.trajectory_combine(snaps, coeffs, anchor, wide)
        assert out.dtype == ref.dtype and out.shape == (3, n)
        assert rel(
            out if kind == "real" else torch.view_as_real(out), ref if kind == "real" else torch.view_as_real(ref)
        ) < (1e-13 if wide else 1e-6)


def test_combine_skips_zero_rows_even_if_they_hold_nan(device):
    snaps = torch.tensor([[1.0, 2.0], [float("nan"), float("nan")]], device=device)
    coeffs = torch.tensor([[2.0], [0.0]], dtype=torch.float64, device=device)
    assert kf.ops.trajectory_combine(snaps, coeffs, None).tolist() == [[2.0, 4.0]]


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("anchored", [False, True])
def test_dots_match_reference(device, storage, anchored):
    gen = torch.Generator().manual_seed(5)
    n = INGEST_CHUNK + 1000
    snaps = torch.randn(4, n, generator=gen).to(device=device, dtype=storage)
    anchor = torch.randn(n, generator=gen).to(device) if anchored else None
    for vdtype in (torch.float32, torch.float64):
        vec = torch.randn(3, n, generator=gen, dtype=vdtype).to(device)
        out = kf.ops.trajectory_dots(snaps, vec, anchor)
        ref = reference.trajectory_dots(snaps, vec, anchor)
        assert out.shape == (4 + anchored, 3) and rel(out, ref) < 1e-12


# ---- CUDA rounds like the CPU ---------------------------------------------------------------------
# trajectory_cuda.cu adds float64 products in the CPU kernels' order (same chunks, 8192-element
# blocks, eight lanes, products never fused), so the results are equal bit for bit, not just close.
# The inputs span a wide dynamic range so that any other order of additions rounds differently
# (test_rounding_inputs_tell_summation_orders_apart checks that on the CPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def wide_range(shape, gen):
    """Normal values scaled by up to e^±6: finite in float16, wide enough for rounding to tell orders apart."""
    scale = torch.exp((2 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(-6, 6))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def rounding_inputs(storage, anchored):
    gen = torch.Generator().manual_seed(11)
    params = [
        wide_range((INGEST_CHUNK + 3 * 8192 + 5,), gen).float(),  # two chunks, a partial last block
        wide_range((700, 13), gen).to(torch.bfloat16).t(),  # strided
        wide_range((301,), gen),  # float64
        wide_range((5,), gen).half(),
    ]
    n = sum(p.numel() for p in params)
    snaps = wide_range((9, n), gen).to(storage)
    anchor = (0.5 * wide_range((n,), gen)).float() if anchored else None
    return params, snaps, anchor


def bits(t):
    return t.contiguous().view(torch.int64) if t.dtype == torch.float64 else t.contiguous().view(torch.int32)


def test_rounding_inputs_tell_summation_orders_apart():
    params, snaps, anchor = rounding_inputs(torch.float32, True)
    slots = [0, 1, 2, 4, 5, 6, 7, 8]
    dots, status = kf.ops.trajectory_ingest(params, snaps, 3, slots, anchor)
    assert int(status[0]) == -1
    row = snaps[3].double()
    other_order = torch.cat([snaps[slots].double() @ row, (row @ row)[None], (row @ anchor.double())[None]])
    assert rel(dots, other_order) < 1e-12
    assert not torch.equal(bits(dots), bits(other_order)), "these inputs must round differently in another order"


@needs_cuda
@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("anchored", [False, True])
def test_cuda_rounds_like_cpu_ingest(storage, anchored):
    params, snaps, anchor = rounding_inputs(storage, anchored)
    slots = [0, 1, 2, 4, 5, 6, 7, 8]  # more than one group of four columns per chunk
    on_gpu = snaps.cuda()
    dots, status = kf.ops.trajectory_ingest(params, snaps, 3, slots, anchor)
    gpu_dots, gpu_status = kf.ops.trajectory_ingest(
        [p.cuda() for p in params], on_gpu, 3, slots, None if anchor is None else anchor.cuda()
    )
    assert status.tolist() == gpu_status.tolist() == [-1]
    assert torch.equal(on_gpu.cpu(), snaps), "the stored rows must be equal"
    assert torch.equal(bits(gpu_dots.cpu()), bits(dots)), "Gram rows must be bit-identical across backends"


@needs_cuda
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_cuda_rounds_like_cpu_combine(anchored, kind):
    _, snaps, anchor = rounding_inputs(torch.bfloat16, anchored)
    gen = torch.Generator().manual_seed(12)
    coeffs = torch.randn(9, 5, generator=gen, dtype=torch.float64 if kind == "real" else torch.complex128)
    coeffs[2] = 0
    coeffs[4, 1] = 0
    for wide in (False, True):
        out = kf.ops.trajectory_combine(snaps, coeffs, anchor, wide)
        gpu = kf.ops.trajectory_combine(snaps.cuda(), coeffs.cuda(), None if anchor is None else anchor.cuda(), wide)
        real = (lambda t: t) if kind == "real" else torch.view_as_real
        assert torch.equal(bits(real(gpu.cpu())), bits(real(out)))


@needs_cuda
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float64], ids=str)
def test_cuda_rounds_like_cpu_dots(anchored, vdtype):
    _, snaps, anchor = rounding_inputs(torch.float16, anchored)
    gen = torch.Generator().manual_seed(13)
    vec = wide_range((3, snaps.shape[1]), gen).to(vdtype)
    out = kf.ops.trajectory_dots(snaps, vec, anchor)
    gpu = kf.ops.trajectory_dots(snaps.cuda(), vec.cuda(), None if anchor is None else anchor.cuda())
    assert torch.equal(bits(gpu.cpu()), bits(out))


def test_empty_combinations(device):
    snaps = torch.randn(3, 5, device=device)
    assert kf.ops.trajectory_combine(snaps, torch.zeros(3, 0, dtype=torch.float64, device=device), None).shape == (0, 5)
    assert kf.ops.trajectory_dots(snaps, torch.zeros(0, 5, device=device), None).shape == (3, 0)


@pytest.mark.slow
def test_rows_past_2_31_elements():
    n = (1 << 30) + 5  # row 1 spans flat indices beyond 2^31
    snaps = torch.zeros(2, n, dtype=torch.bfloat16)
    param = torch.tensor([0.5]).expand(n)  # stride 0: no memory
    dots, status = kf.ops.trajectory_ingest([param], snaps, 1, [0], None)
    assert int(status[0]) == -1 and dots.tolist() == [0.0, 0.25 * n, 0.0]
    assert float(snaps[1, -1]) == 0.5 and float(snaps[1, 0]) == 0.5 and float(snaps[0, -1]) == 0.0
    del param
    out = kf.ops.trajectory_combine(snaps, torch.tensor([[0.0], [2.0]], dtype=torch.float64), None)
    assert float(out[0, -1]) == 1.0 and float(out[0, 12345]) == 1.0


def test_errors(device):
    p = [torch.ones(3, device=device)]
    snaps = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match=r"trajectory_ingest: expected snapshots to be a 2-dim \[capacity, N\] tensor"):
        kf.ops.trajectory_ingest(p, torch.zeros(3, device=device), 0, [], None)
    with pytest.raises(TypeError, match=r"trajectory_ingest: expected snapshots to be float32, bfloat16 or float16"):
        kf.ops.trajectory_ingest(p, snaps.double(), 0, [], None)
    with pytest.raises(ValueError, match=r"expected params holding 3 elements in all \(a snapshot row\), got 4"):
        kf.ops.trajectory_ingest([torch.ones(4, device=device)], snaps, 0, [], None)
    with pytest.raises(ValueError, match=r"expected slot in \[0, 2\), got 2"):
        kf.ops.trajectory_ingest(p, snaps, 2, [], None)
    with pytest.raises(ValueError, match=r"expected dot_slots in \[0, 2\) and different from slot 0, got 0"):
        kf.ops.trajectory_ingest(p, snaps, 0, [0], None)
    with pytest.raises(ValueError, match=r"expected anchor to have shape \[3\], got \[2\]"):
        kf.ops.trajectory_ingest(p, snaps, 0, [], torch.ones(2, device=device))
    with pytest.raises(TypeError, match=r"expected anchor to be float32, got Double"):
        kf.ops.trajectory_ingest(p, snaps, 0, [], torch.ones(3, device=device).double())
    with pytest.raises(TypeError, match=r"expected params\[0\] to be a floating-point tensor, got Long"):
        kf.ops.trajectory_ingest([torch.ones(3, dtype=torch.long, device=device)], snaps, 0, [], None)
    with pytest.raises(
        ValueError, match=r"trajectory_combine: expected coeffs to have shape \[capacity = 2, m\], got \[3, 1\]"
    ):
        kf.ops.trajectory_combine(snaps, torch.ones(3, 1, dtype=torch.float64, device=device), None)
    with pytest.raises(TypeError, match=r"trajectory_combine: expected coeffs to be float64 or complex128, got Float"):
        kf.ops.trajectory_combine(snaps, torch.ones(2, 1, device=device), None)
    with pytest.raises(ValueError, match=r"trajectory_dots: expected vectors to have shape \[m, N = 3\], got \[1, 4\]"):
        kf.ops.trajectory_dots(snaps, torch.ones(1, 4, device=device), None)
