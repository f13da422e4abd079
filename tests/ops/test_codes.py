"""sign_codes, hamming_distance and pairwise_hamming against their unpacked-bool reference twins.

Codes are integers: kernels and references must agree exactly, on every device.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koopfast as kf
from koopfast import reference

from conftest import DEVICES

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CHUNK_WORDS = 1 << 12  # csrc/codes/codes.h, kChunkWords
SIGN_BLOCK_BITS = 64 * 64  # csrc/codes/codes_cpu.cpp, kSignBlockWords words per work item
PAIR_TILE = 16  # rows per tile of pairwise_hamming (CPU and CUDA)
PAIR_TILE_WORDS = 512  # words per step of the CPU pairwise tiles


def random_codes(units: int, words: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (units, words), generator=g, dtype=torch.int64).to(device)


def signed_values(shape, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return (x > 0).to(device) if dtype == torch.bool else x.to(dtype).to(device)


def check_sign_codes(x: torch.Tensor, dim: int) -> torch.Tensor:
    codes = kf.ops.sign_codes(x, dim)
    expected = reference.sign_codes(x.cpu(), dim)
    assert codes.dtype == torch.int64 and codes.device == x.device and codes.is_contiguous()
    assert codes.shape == expected.shape
    assert torch.equal(codes.cpu(), expected)
    # The unpacked bits are the signs, and the padding after the last bit is zero.
    bits = reference.sign_bits(x.cpu(), dim)
    unpacked = reference.unpack_codes(codes.cpu())
    assert torch.equal(unpacked[:, : bits.shape[1]], bits)
    assert not unpacked[:, bits.shape[1] :].any()
    return codes


# ---- sign_codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*FLOATS, torch.bool], ids=str)
@pytest.mark.parametrize(
    ("outer", "inner"),
    [(1, 1), (1, 63), (1, 64), (1, 65), (7, 9), (8, 8), (5, 13), (65, 1), (127, 1), (3, 43), (64, 64), (17, 241)],
    ids=lambda v: str(v),
)
def test_sign_codes_odd_bit_counts_and_word_boundaries(device, dtype, outer, inner):
    x = signed_values((outer, 3, inner), dtype, device, seed=outer * 1000 + inner)
    check_sign_codes(x, 1)


@pytest.mark.parametrize("bits", [SIGN_BLOCK_BITS - 1, SIGN_BLOCK_BITS, SIGN_BLOCK_BITS + 1, 2 * SIGN_BLOCK_BITS + 65])
def test_sign_codes_work_item_boundaries(device, bits):
    check_sign_codes(signed_values((2, 5, bits), torch.float32, device, seed=bits), 1)
    check_sign_codes(signed_values((bits, 3), torch.float32, device, seed=bits + 1), 1)  # a linear layer's output


@pytest.mark.parametrize(("outer", "units", "inner"), [(130, 3, 64), (100, 20, 96), (50, 17, 100), (33, 33, 1000)])
def test_sign_codes_memory_order_blocks(device, outer, units, inner):
    """Long contiguous rows are coded sample by sample in blocks of units x samples that start on a
    word boundary (csrc/codes/codes_cpu.cpp, sign_codes_by_stream): cross both kinds of block."""
    x = signed_values((outer, units, inner), torch.float32, device, seed=outer + units + inner)
    check_sign_codes(x, 1)
    check_sign_codes(x[::2], 1)  # a batch stride of its own


def test_sign_codes_every_dim_of_a_4d_tensor(device):
    x = signed_values((3, 4, 5, 6), torch.float32, device, seed=7)
    for dim in range(-4, 4):
        check_sign_codes(x, dim)


def test_sign_codes_non_contiguous_layouts(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, 5, 7, generator=g).to(device)
    check_sign_codes(x.to(memory_format=torch.channels_last), 1)  # a view [outer, units, inner] with unit stride 1
    check_sign_codes(x.permute(2, 0, 3, 1), 3)
    check_sign_codes(x[::2, 1:, :, ::3], 1)  # sliced with steps
    check_sign_codes(x.transpose(2, 3), 1)  # no [outer, units, inner] view: copied
    check_sign_codes(torch.randn(1, 6, 1, generator=g).to(device).expand(70, 6, 3), 1)  # stride 0
    check_sign_codes(torch.randn(9, 70, generator=g).to(device).t(), 1)  # transposed linear output
    check_sign_codes(torch.randn([2] * 9, generator=g).to(device).permute(*reversed(range(9))), 4)


def test_sign_codes_special_values(device):
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45, 1e-310, 3.0, -2.0]
    for dtype in FLOATS:
        x = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(1, -1).to(device)
        codes = check_sign_codes(x, 0)  # subnormals (or their rounding to ±0) as torch's x > 0 says
        bits = reference.unpack_codes(codes.cpu(), len(values))[0].tolist()
        assert bits[:5] == [False, True, False, False, False], dtype  # NaN -> 0, inf -> 1, -inf and ±0 -> 0
        assert bits[-2:] == [True, False]


def test_sign_codes_empty_and_size_one(device):
    assert kf.ops.sign_codes(torch.randn(0, 5, 3, device=device), 1).shape == (5, 0)
    assert kf.ops.sign_codes(torch.randn(4, 0, 3, device=device), 1).shape == (0, 1)
    assert kf.ops.sign_codes(torch.randn(4, 0, device=device), 0).shape == (4, 0)
    check_sign_codes(torch.tensor([2.0], device=device), 0)
    check_sign_codes(torch.tensor([[-2.0]], device=device), 1)
    assert kf.ops.sign_codes(torch.tensor([1.0, -1.0, 2.0], device=device), 0).tolist() == [[1], [0], [1]]


def test_codes_distance_equals_the_bool_comparison(device):
    """The twin the issue asks for: Hamming distances of packed codes equal unpacked bool comparisons."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(10, 16, 5, 5, generator=g).to(device)  # 250 bits per unit
    y = x + 0.3 * torch.randn(x.shape, generator=g).to(device)
    (dist,) = kf.ops.hamming_distance([kf.ops.sign_codes(x, 1)], [kf.ops.sign_codes(y, 1)])
    expected = ((x > 0) != (y > 0)).transpose(0, 1).reshape(16, -1).sum(1)
    assert torch.equal(dist, expected)
    pairs = kf.ops.pairwise_hamming(kf.ops.sign_codes(x, 1))
    flags = (x > 0).transpose(0, 1).reshape(16, -1)
    assert torch.equal(pairs, (flags.unsqueeze(1) != flags.unsqueeze(0)).sum(-1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=4),
    dim_seed=st.integers(0, 100),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bool]),
    device=st.sampled_from(DEVICES),
)
def test_sign_codes_random_shapes(shape, dim_seed, dtype, device):
    x = signed_values(tuple(shape), dtype, device, seed=dim_seed)
    check_sign_codes(x, dim_seed % len(shape) - len(shape) * (dim_seed % 2))


def test_sign_codes_errors(device):
    with pytest.raises(TypeError, match=r"koopfast::sign_codes: expected x to be float16, .* or bool, got Int"):
        kf.ops.sign_codes(torch.ones(3, 4, dtype=torch.int32, device=device), 1)
    with pytest.raises(ValueError, match="koopfast::sign_codes: expected x to have at least one dimension"):
        kf.ops.sign_codes(torch.tensor(1.0, device=device), 0)
    with pytest.raises(ValueError, match=r"koopfast::sign_codes: expected dim in \[-2, 1\] .* got 2"):
        kf.ops.sign_codes(torch.ones(3, 4, device=device), 2)


# ---- hamming_distance -----------------------------------------------------------------------------


def check_hamming(a, b):
    out = kf.ops.hamming_distance(a, b)
    expected = reference.hamming_distance([x.cpu() for x in a], [y.cpu() for y in b])
    assert len(out) == len(a)
    for o, e, x in zip(out, expected, a):
        assert o.dtype == torch.int64 and o.device == x.device and o.shape == (x.shape[0],)
        assert torch.equal(o.cpu(), e)
    return out


@pytest.mark.parametrize(
    "words", [0, 1, 7, 63, 64, 65, CHUNK_WORDS - 1, CHUNK_WORDS, CHUNK_WORDS + 1, 2 * CHUNK_WORDS + 3]
)
def test_hamming_matches_reference_over_chunk_boundaries(device, words):
    a = [random_codes(3, words, device, 1), random_codes(1, 5, device, 2)]
    b = [random_codes(3, words, device, 3), random_codes(1, 5, device, 4)]
    check_hamming(a, b)
    check_hamming(a, [])


@pytest.mark.parametrize(
    "rows", [1, CHUNK_WORDS // 7 - 1, CHUNK_WORDS // 7, CHUNK_WORDS // 7 + 1, 2 * (CHUNK_WORDS // 7) + 1]
)
def test_hamming_short_rows_grouped_into_chunks(device, rows):
    check_hamming([random_codes(rows, 7, device, rows)], [random_codes(rows, 7, device, rows + 1)])


def test_hamming_special_words_and_empty_tensors(device):
    words = torch.tensor([[0, -1, -(2**63), 2**63 - 1, 1, -2]], dtype=torch.int64, device=device)
    (popcount,) = check_hamming([words], [])
    assert popcount.tolist() == [0 + 64 + 1 + 63 + 1 + 63]
    (dist,) = check_hamming([words], [torch.zeros_like(words) - 1])
    assert dist.tolist() == [64 + 0 + 63 + 1 + 63 + 1]
    empty = [torch.zeros(0, 4, dtype=torch.int64, device=device), torch.zeros(3, 0, dtype=torch.int64, device=device)]
    out = check_hamming([*empty, words], [])
    assert out[0].shape == (0,) and out[1].tolist() == [0, 0, 0]


def test_hamming_non_contiguous_codes(device):
    base = random_codes(40, 30, device, 5)
    other = random_codes(30, 40, device, 6)
    a = [base[::3, 1::2], base.t(), base[:1].expand(6, 30), base[5:9]]
    b = [other.t()[::3, 1::2], other, other.t()[:6], other.t()[5:9]]
    check_hamming(a, b)
    check_hamming(a, [])


def test_hamming_counts_past_2_32_in_one_row(device):
    words = (1 << 26) + 5  # 64 * words > 2^32 bits, all set; stride-0 storage
    a = torch.full((1, 1), -1, dtype=torch.int64, device=device).expand(2, words)
    (count,) = kf.ops.hamming_distance([a], [])
    assert count.tolist() == [64 * words, 64 * words]
    (dist,) = kf.ops.hamming_distance([a], [torch.zeros(1, 1, dtype=torch.int64, device=device).expand(2, words)])
    assert dist.tolist() == [64 * words, 64 * words]


def test_hamming_errors(device):
    a = random_codes(3, 4, device, 7)
    with pytest.raises(ValueError, match="koopfast::hamming_distance: expected a to be a non-empty list"):
        kf.ops.hamming_distance([], [])
    with pytest.raises(ValueError, match=r"expected b to be empty or to hold one tensor per tensor of a \(2\), got 1"):
        kf.ops.hamming_distance([a, a], [a])
    with pytest.raises(ValueError, match=r"expected b\[0\] to have the shape of a\[0\] \[3, 4\], got \[3, 5\]"):
        kf.ops.hamming_distance([a], [random_codes(3, 5, device, 8)])
    with pytest.raises(TypeError, match=r"expected a\[1\] to be int64 codes, got Int"):
        kf.ops.hamming_distance([a, a.int()], [])
    with pytest.raises(ValueError, match=r"expected b\[0\] to be 2-D codes \[units, words\], got shape \[12\]"):
        kf.ops.hamming_distance([a], [a.reshape(-1)])


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a second device")
def test_hamming_rejects_mixed_devices():
    a = random_codes(3, 4, "cpu", 9)
    with pytest.raises(ValueError, match="expected all tensors on one device"):
        kf.ops.hamming_distance([a.cuda()], [a])


# ---- pairwise_hamming -----------------------------------------------------------------------------


def check_pairwise(codes: torch.Tensor) -> torch.Tensor:
    out = kf.ops.pairwise_hamming(codes)
    c = codes.cpu()
    assert out.dtype == torch.int64 and out.device == codes.device and out.shape == (c.shape[0], c.shape[0])
    if c.shape[0] * c.shape[0] * c.shape[1] <= 1 << 17:
        expected = reference.pairwise_hamming(c)
    else:  # no [units, units, bits] tensor: d(i, j) = b_i·(1 - b_j) + (1 - b_i)·b_j, exact in fp64
        bits = reference.unpack_codes(c).double()
        expected = (bits @ (1 - bits).t() + (1 - bits) @ bits.t()).round().long()
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(out, out.t()) and not out.diagonal().any()
    return out


@pytest.mark.parametrize("units", [1, 2, 3, 4, 5, PAIR_TILE - 1, PAIR_TILE, PAIR_TILE + 1, 2 * PAIR_TILE + 1])
@pytest.mark.parametrize("words", [0, 1, 2, 33, PAIR_TILE_WORDS - 1, PAIR_TILE_WORDS + 1, 2 * PAIR_TILE_WORDS + 6])
def test_pairwise_matches_reference_over_tile_boundaries(device, units, words):
    check_pairwise(random_codes(units, words, device, units * 1000 + words))


def test_pairwise_empty_and_non_contiguous(device):
    assert kf.ops.pairwise_hamming(torch.zeros(0, 3, dtype=torch.int64, device=device)).shape == (0, 0)
    base = random_codes(30, 50, device, 10)
    check_pairwise(base.t()[::2])
    check_pairwise(base[:, 3::4])
    check_pairwise(base[:1].expand(5, 50))  # five identical units: all distances 0


def test_pairwise_duplicates_and_complements(device):
    c = random_codes(6, 3, device, 11)
    c[4] = c[1]
    c[5] = ~c[2]
    d = check_pairwise(c)
    assert d[1, 4] == 0 and d[2, 5] == 3 * 64


def test_pairwise_errors(device):
    with pytest.raises(TypeError, match="koopfast::pairwise_hamming: expected codes to be int64 codes, got Float"):
        kf.ops.pairwise_hamming(torch.zeros(3, 2, device=device))
    with pytest.raises(ValueError, match=r"expected codes to be 2-D codes \[units, words\], got shape \[3, 2, 1\]"):
        kf.ops.pairwise_hamming(torch.zeros(3, 2, 1, dtype=torch.int64, device=device))


# ---- index math past 2^31 -------------------------------------------------------------------------


@pytest.mark.slow
def test_sign_codes_more_than_2_31_bits_per_unit():
    m = (1 << 31) // 3 + 100
    x = torch.tensor([-1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 1, m)  # 3m > 2^31 bits, stride 0
    codes = kf.ops.sign_codes(x, 1)
    bits = 3 * m
    assert codes.shape == (1, (bits + 63) // 64)
    (ones,) = kf.ops.hamming_distance([codes], [])
    assert ones.item() == 2 * m
    # Bit j is set iff j >= m: check the words around the boundary and the last one.
    w = m // 64
    expected_word = -(1 << (m % 64)) if m % 64 else -1
    assert codes[0, w].item() == expected_word
    assert codes[0, w - 1].item() == 0 and codes[0, w + 1].item() == -1
    last_bits = bits - 64 * (codes.shape[1] - 1)  # all set: they lie past m
    last_word = (1 << last_bits) - 1
    assert codes[0, -1].item() == (last_word - (1 << 64) if last_word >= 1 << 63 else last_word)
