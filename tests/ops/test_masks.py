"""pack_masks, unpack_masks, count_masks and apply_masks against their reference twins, on every device.

Masks are bits and application is a selection, so kernels and references must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koopfast as kf
from koopfast import reference

from conftest import DEVICES

CHUNK = 1 << 16  # csrc/common/chunks.h
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 13]


def random_masks(shapes, device, gen, p=0.5) -> list[torch.Tensor]:
    return [(torch.rand(s, generator=gen) < p).to(device) for s in shapes]


def check_pack_roundtrip(masks):
    packed = kf.ops.pack_masks(masks)
    ref = reference.pack_masks([m.cpu() for m in masks])
    numels = [m.numel() for m in masks]
    for p, r, m in zip(packed, ref, masks):
        assert p.dtype == torch.uint8 and p.shape == ((m.numel() + 7) // 8,) and p.is_contiguous()
        assert p.device == m.device
        assert torch.equal(p.cpu(), r)
        # the documented format: numpy.packbits over the flattened (row-major) mask, little bit order
        assert np.array_equal(p.cpu().numpy(), np.packbits(m.cpu().reshape(-1).numpy(), bitorder="little"))
    unpacked = kf.ops.unpack_masks(packed, numels)
    for u, m in zip(unpacked, masks):
        assert u.dtype == torch.bool and u.shape == (m.numel(),) and u.is_contiguous() and u.device == m.device
        assert torch.equal(u.reshape(m.shape), m)
    expected = [int(m.sum()) for m in masks]
    assert kf.ops.count_masks(masks, numels).tolist() == expected
    assert kf.ops.count_masks(packed, numels).tolist() == expected
    assert kf.ops.count_masks(packed, numels).device == masks[0].device


def check_apply(targets, masks, mask_index):
    expected = [t.detach().cpu().clone() for t in targets]
    reference.apply_masks(expected, [m.cpu() for m in masks], mask_index)
    kf.ops.apply_masks(targets, masks, mask_index)
    for t, e in zip(targets, expected):
        assert torch.equal(t.cpu(), e)
        pruned = e == 0
        assert not torch.signbit(t.cpu()[pruned]).any(), "pruned entries must be +0"


@pytest.mark.parametrize("size", SIZES)
def test_pack_unpack_count_sizes_and_chunk_boundaries(device, size):
    gen = torch.Generator().manual_seed(size)
    check_pack_roundtrip(random_masks([(size,), (3,), (size, 1)], device, gen))


def test_pack_many_tensors_of_odd_shapes(device):
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (1,), (0,), (17, 1, 3), (2, CHUNK // 2 - 1), (), (9, 0, 2)]
    for p in (0.0, 0.1, 0.5, 1.0):
        check_pack_roundtrip(random_masks(shapes, device, gen, p))


def test_pack_and_count_non_contiguous_masks(device):
    gen = torch.Generator().manual_seed(2)
    base = (torch.rand(6, 40, 9, generator=gen) < 0.5).to(device)
    masks = [
        base.transpose(0, 2),
        base[:, ::3, 1:],
        (torch.rand(1, 7, generator=gen) < 0.5).to(device).expand(5, 7),  # stride 0
        (torch.rand(2, 3, 4, 5, generator=gen) < 0.5).to(device).to(memory_format=torch.channels_last),
        (torch.rand([2] * 10, generator=gen) < 0.5).to(device).permute(*reversed(range(10))),  # > 8 dims: a copy
    ]
    check_pack_roundtrip(masks)


def test_unpack_and_count_read_strided_packed_bytes(device):
    gen = torch.Generator().manual_seed(3)
    m = random_masks([(100,)], device, gen)[0]
    packed = kf.ops.pack_masks([m])[0]
    strided = torch.zeros(2 * packed.numel(), dtype=torch.uint8, device=device)
    strided[::2] = packed
    view = strided[::2]
    assert not view.is_contiguous()
    assert torch.equal(kf.ops.unpack_masks([view], [100])[0], m)
    assert kf.ops.count_masks([view], [100]).tolist() == [int(m.sum())]


def test_count_ignores_bits_past_the_end(device):
    packed = torch.tensor([0xFF, 0xFF], dtype=torch.uint8, device=device)
    assert kf.ops.count_masks([packed, packed, packed], [9, 16, 13]).tolist() == [9, 16, 13]
    assert kf.ops.unpack_masks([packed], [9])[0].tolist() == [True] * 9


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_apply_matches_reference_bool_and_packed(device, dtype, size):
    gen = torch.Generator().manual_seed(size + 7)
    shapes = [(size,), (size, 3), (5,)]
    masks = random_masks(shapes, device, gen, 0.3)
    packed = kf.ops.pack_masks(masks)
    targets = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    copies = [t.clone() for t in targets]
    check_apply(targets, masks, [0, 1, 2])
    check_apply(copies, packed, [0, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(targets, copies))


def test_apply_one_mask_to_parameter_gradient_and_states_in_one_call(device):
    """The use in training: each mask serves several targets of mixed dtypes, some masks packed."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(64, 33), (33,), (8, 3, 3, 3)]
    masks = random_masks(shapes, device, gen, 0.2)
    mixed = [kf.ops.pack_masks([masks[0]])[0], masks[1], kf.ops.pack_masks([masks[2]])[0]]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device).to(torch.bfloat16) for s in shapes]
    states = [torch.randn(s, generator=gen).to(device).double() for s in shapes]
    check_apply(params + grads + states, mixed, [0, 1, 2] * 3)


def test_apply_non_contiguous_targets_and_masks(device):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(6, 40, 9, generator=gen).to(device)
    targets = [
        base.transpose(0, 2),  # permuted
        torch.randn(7, 12, generator=gen).to(device)[:, ::3],  # sliced with steps
        torch.randn(2, 3, 4, 5, generator=gen).to(device).to(memory_format=torch.channels_last),
    ]
    masks = [
        (torch.rand(6, 40, 9, generator=gen) < 0.5).to(device),  # contiguous mask of a permuted target
        (torch.rand(4, 7, generator=gen) < 0.5).to(device).t(),
        (torch.rand(2, 3, 4, 5, generator=gen) < 0.5).to(device),
    ]
    masks[0] = masks[0].transpose(0, 2)
    packed = kf.ops.pack_masks(masks)
    copies = [t.clone() for t in targets]
    check_apply(targets, masks, [0, 1, 2])
    check_apply(copies, packed, [0, 1, 2])


def test_apply_zeroes_nan_inf_and_negative_zero_and_keeps_them_where_kept(device):
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, -1.5, 2.0, float("nan"), -0.0])
    keep = torch.tensor([False, False, False, False, False, True, True, True])
    for dtype in DTYPES:
        x = values.to(dtype).to(device)
        kf.ops.apply_masks([x], [keep.to(device)], [0])
        out = x.float().cpu()
        assert out[:5].tolist() == [0.0] * 5 and not torch.signbit(out[:5]).any()
        assert out[5] == 2.0 and torch.isnan(out[6]) and torch.signbit(out[7])


def test_reapplying_is_idempotent_and_leaves_kept_entries_alone(device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3 * CHUNK + 5, generator=gen).to(device)
    mask = random_masks([x.shape], device, gen, 0.1)[0]
    kf.ops.apply_masks([x], [mask], [0])
    once = x.clone()
    kf.ops.apply_masks([x], kf.ops.pack_masks([mask]), [0])
    assert torch.equal(x, once)
    assert torch.equal(x[mask], torch.where(mask, once, 0)[mask])
    assert int((x != 0).sum()) == int(mask.sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_over_alternating_clean_and_dirty_blocks(device, dtype):
    """Blocks of 64 whose pruned entries are already zero next to blocks that need writing, and
    lone dirty blocks far apart: every path of the CPU kernel's check-then-write loop."""
    gen = torch.Generator().manual_seed(9)
    n = 64 * 2000 + 37
    mask = torch.rand(n, generator=gen) < 0.3
    x = torch.randn(n, generator=gen).to(dtype)
    block = torch.arange(n) // 64
    clean = ((block // 7) % 3 == 0) | (block > 1000)
    x[clean & ~mask] = 0
    lone = torch.arange(1100, 2000, 37) * 64 + 5  # one nonzero pruned entry in far-apart blocks
    mask[lone] = False
    x[lone] = 1.5
    for form in (mask, kf.ops.pack_masks([mask])[0]):
        check_apply([x.clone().to(device)], [form.to(device)], [0])


def test_empty_lists_are_valid_calls():
    assert kf.ops.pack_masks([]) == []
    assert kf.ops.unpack_masks([], []) == []
    assert kf.ops.count_masks([], []).tolist() == []
    kf.ops.apply_masks([], [], [])
    kf.ops.apply_masks([], [torch.ones(3, dtype=torch.bool)], [])


def test_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(7)
    masks = random_masks([(3 * CHUNK + 11,), (1000,)], "cpu", gen)
    x = torch.randn(3 * CHUNK + 11, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = x.clone()
            kf.ops.apply_masks([y], masks, [0])
            packed = kf.ops.pack_masks(masks)
            results.append((packed, kf.ops.count_masks(packed, [m.numel() for m in masks]), y))
    finally:
        torch.set_num_threads(threads)
    for packed, counts, y in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(packed, results[0][0]))
        assert torch.equal(counts, results[0][1]) and torch.equal(y, results[0][2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_lists(data):
    """Random shapes and densities, bool or packed masks, shared masks, mixed dtypes; every device."""
    n_masks = data.draw(st.integers(1, 4))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))) for _ in range(n_masks)]
    p = data.draw(st.floats(0, 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    packed_flags = data.draw(st.lists(st.booleans(), min_size=n_masks, max_size=n_masks))
    mask_index = data.draw(st.lists(st.integers(0, n_masks - 1), min_size=0, max_size=5))
    dtypes = data.draw(st.lists(st.sampled_from(DTYPES), min_size=len(mask_index), max_size=len(mask_index)))
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(shapes, "cpu", gen, p)
    targets = [torch.randn(shapes[j], generator=gen).to(d) for j, d in zip(mask_index, dtypes)]
    for device in DEVICES:
        dev_masks = [m.to(device) for m in masks]
        check_pack_roundtrip(dev_masks)
        given_masks = [kf.ops.pack_masks([m])[0] if f else m for m, f in zip(dev_masks, packed_flags)]
        check_apply([t.to(device) for t in targets], given_masks, mask_index)


def test_compiles_fullgraph(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def prune_step(w, g, m):
        packed = kf.ops.pack_masks([m])
        kf.ops.apply_masks([w, g], packed, [0, 0])
        return kf.ops.count_masks(packed, [m.numel()])

    gen = torch.Generator().manual_seed(8)
    w, g = torch.randn(20, 7, generator=gen).to(device), torch.randn(20, 7, generator=gen).to(device)
    m = random_masks([(20, 7)], device, gen)[0]
    w_ref, g_ref = w.clone(), g.clone()
    count = prune_step(w, g, m)
    reference.apply_masks([w_ref, g_ref], [m], [0, 0])
    assert torch.equal(w, w_ref) and torch.equal(g, g_ref) and count.tolist() == [int(m.sum())]


# ---- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_op_the_argument_and_what_came(device):
    x = torch.randn(4, 3, device=device)
    m = torch.ones(4, 3, dtype=torch.bool, device=device)
    packed = kf.ops.pack_masks([m])[0]
    with pytest.raises(TypeError, match=r"pack_masks: expected masks\[0\] to be bool, got Float"):
        kf.ops.pack_masks([x])
    with pytest.raises(TypeError, match=r"unpack_masks: expected packed\[0\] to be uint8, got Bool"):
        kf.ops.unpack_masks([m], [12])
    with pytest.raises(ValueError, match=r"unpack_masks: expected packed\[0\] to have shape \[1\] .*got shape \[2\]"):
        kf.ops.unpack_masks([packed], [8])
    with pytest.raises(ValueError, match=r"unpack_masks: expected numels to hold one entry per tensor of packed"):
        kf.ops.unpack_masks([packed], [])
    with pytest.raises(ValueError, match=r"unpack_masks: expected numels\[0\] to be >= 0, got -1"):
        kf.ops.unpack_masks([packed], [-1])
    with pytest.raises(ValueError, match=r"count_masks: expected masks\[0\] to have numels\[0\] = 5 elements, got 12"):
        kf.ops.count_masks([m], [5])
    with pytest.raises(TypeError, match=r"count_masks: expected masks\[0\] to be bool, or uint8 \(packed\), got Float"):
        kf.ops.count_masks([x], [12])
    with pytest.raises(TypeError, match=r"apply_masks: expected targets\[0\] to be float16, .* got Long"):
        kf.ops.apply_masks([torch.ones(4, 3, dtype=torch.long, device=device)], [m], [0])
    with pytest.raises(TypeError, match=r"apply_masks: expected masks\[0\] to be bool, or uint8 \(packed\), got Float"):
        kf.ops.apply_masks([x], [x], [0])
    with pytest.raises(
        ValueError, match=r"apply_masks: expected masks\[0\] to have the shape of targets\[0\] \[4, 3\]"
    ):
        kf.ops.apply_masks([x], [m.t()], [0])
    with pytest.raises(
        ValueError, match=r"apply_masks: expected masks\[0\] \(packed, for targets\[0\] of 12 elements\)"
    ):
        kf.ops.apply_masks([x], [torch.zeros(1, dtype=torch.uint8, device=device)], [0])
    with pytest.raises(ValueError, match=r"apply_masks: expected mask_index\[0\] in \[0, 1\) .*got 1"):
        kf.ops.apply_masks([x], [m], [1])
    with pytest.raises(ValueError, match=r"apply_masks: expected mask_index to hold one entry per target \(1\), got 2"):
        kf.ops.apply_masks([x], [m], [0, 0])
    with pytest.raises(ValueError, match=r"apply_masks: expected targets\[0\] to have no internal overlap"):
        kf.ops.apply_masks([torch.randn(1, 3, device=device).expand(4, 3)], [m], [0])
    with pytest.raises(ValueError, match=r"apply_masks: expected targets not to share memory, got targets\[0\] and"):
        kf.ops.apply_masks([x, x[1:]], [m, m[1:]], [0, 1])
    with pytest.raises(ValueError, match=r"apply_masks: expected targets\[0\] to have at most 8 dimensions"):
        y = torch.randn([2] * 10, device=device).permute(*reversed(range(10)))
        kf.ops.apply_masks([y], [torch.ones_like(y, dtype=torch.bool)], [0])


def test_a_rejected_call_leaves_the_targets_untouched(device):
    x = torch.randn(4, 3, device=device)
    y = torch.randn(5, device=device)
    before = x.clone()
    with pytest.raises(ValueError):
        kf.ops.apply_masks([x, y], [torch.zeros(4, 3, dtype=torch.bool, device=device)], [0, 0])
    assert torch.equal(x, before)


def test_mixed_devices_are_rejected():
    if len(DEVICES) < 2:
        pytest.skip("needs a second device")
    x = torch.randn(3)
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got targets\[0\] on cpu and masks\[0\]"):
        kf.ops.apply_masks([x], [torch.ones(3, dtype=torch.bool, device="cuda")], [0])
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got masks\[0\] on cpu and masks\[1\]"):
        kf.ops.pack_masks([torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool, device="cuda")])
