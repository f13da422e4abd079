// CPU backend of the codes ops (at::parallel_for over work items fixed by the shapes).
//
// sign_codes: the comparisons go to a byte buffer first (a loop that vectorizes along contiguous
// runs), and eight bytes become eight bits with one multiplication (pack_flag_bytes). A work item
// is a block of words of one unit when a unit's bits come in long runs (inner >= 64), else a tile
// of units x words walked in memory order.
// hamming_distance: per chunk (make_code_chunks), per row, a popcount of (a xor b); a long row split
// over several chunks adds its partial counts atomically (integers: the sum is exact in any order).
// pairwise_hamming: 16x16 tiles of the (symmetric) distance matrix, each computed once by one task
// with a 4x4 register block over the words, and written to both halves.
//
// popcount: the POPCNT instruction is not in the x86-64 baseline these sources are compiled for,
// so the popcount loops are compiled twice, with and without target("popcnt"), and picked at run
// time (one check). Without it, GCC calls a slow library routine for every word.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "codes/codes_args.h"
#include "common/checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KF_POPCNT_TARGET __attribute__((target("popcnt")))
#define KF_HAS_POPCNT_DISPATCH 1
#else
#define KF_POPCNT_TARGET
#define KF_HAS_POPCNT_DISPATCH 0
#endif

namespace koopfast {
namespace {

// ---- sign_codes ---------------------------------------------------------------------------------

constexpr int64_t kSignBlockWords = 64;  // words per work item: 4096 flags in a 4 KiB buffer

template <class S>
KF_INLINE uint8_t is_positive(S v) {
  if constexpr (std::is_same_v<S, bool>) {
    return static_cast<uint8_t>(v);
  } else if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>) {
    return static_cast<float>(v) > 0.0f;
  } else {
    return v > S(0);  // NaN > 0 is false: NaN gives bit 0, like torch's x > 0
  }
}

// Flags of the bits [jb, je) of unit u, in bit order, into flags[0, je - jb): runs along inner.
template <class S>
void fill_flags(const SignInput& in, int64_t u, int64_t jb, int64_t je, uint8_t* flags) {
  const S* base = static_cast<const S*>(in.data) + u * in.unit_stride;
  const int64_t n = je - jb;
  int64_t o = jb / in.inner;
  int64_t i = jb - o * in.inner;
  const int64_t si = in.inner_stride;
  for (int64_t k = 0; k < n;) {
    const int64_t run = std::min(n - k, in.inner - i);
    const S* p = base + o * in.outer_stride + i * si;
    uint8_t* f = flags + k;
    if (si == 1) {
      for (int64_t t = 0; t < run; ++t) f[t] = is_positive(p[t]);  // vectorized for float and double
    } else {
      for (int64_t t = 0; t < run; ++t) f[t] = is_positive(p[t * si]);
    }
    k += run;
    ++o;
    i = 0;
  }
}

// Packs flags[0, 64 * (w1 - w0)) into the words [w0, w1) of dst.
KF_INLINE void pack_flags(const uint8_t* flags, int64_t w0, int64_t w1, int64_t* dst) {
  for (int64_t w = w0; w < w1; ++w) {
    const uint8_t* f = flags + (w - w0) * kBitsPerWord;
    uint64_t word = 0;
    for (int byte = 0; byte < 8; ++byte) {
      uint64_t eight;
      std::memcpy(&eight, f + 8 * byte, 8);
      word |= pack_flag_bytes(eight) << (8 * byte);
    }
    dst[w] = static_cast<int64_t>(word);
  }
}

// Long strided rows (inner >= kTiledInner, inner stride != 1: channels_last and other layouts):
// one unit per work item, runs of `inner` elements.
template <class S>
void sign_codes_by_unit(const SignInput& in, int64_t* out) {
  const int64_t bits = in.bits();
  const int64_t words = words_for_bits(bits);
  const int64_t blocks = (words + kSignBlockWords - 1) / kSignBlockWords;
  at::parallel_for(0, in.units * blocks, 4, [&](int64_t b, int64_t e) {
    alignas(64) uint8_t flags[kSignBlockWords * kBitsPerWord];
    for (int64_t item = b; item < e; ++item) {
      const int64_t u = item / blocks;
      const int64_t w0 = (item - u * blocks) * kSignBlockWords;
      const int64_t w1 = std::min(words, w0 + kSignBlockWords);
      const int64_t jb = w0 * kBitsPerWord;
      const int64_t je = std::min(bits, w1 * kBitsPerWord);
      fill_flags<S>(in, u, jb, je, flags);
      std::memset(flags + (je - jb), 0, static_cast<size_t>((w1 - w0) * kBitsPerWord - (je - jb)));
      pack_flags(flags, w0, w1, out + u * words);
    }
  });
}

// Short rows (a linear layer's [batch, features], small feature maps): a unit's bits are scattered
// in runs shorter than a word, so a work item takes a tile of kSignTileUnits units x kSignTileWords words
// and walks x in memory order (o, then the tile's units, then i), filling one flag buffer per unit.
constexpr int64_t kTiledInner = 64;
constexpr int64_t kSignTileUnits = 16;
constexpr int64_t kSignTileWords = 16;  // 16 units x 1024 flags: 16 KiB, in L1

template <class S>
void sign_codes_by_tile(const SignInput& in, int64_t* out) {
  const int64_t bits = in.bits();
  const int64_t words = words_for_bits(bits);
  const int64_t unit_tiles = (in.units + kSignTileUnits - 1) / kSignTileUnits;
  const int64_t word_tiles = (words + kSignTileWords - 1) / kSignTileWords;
  const S* x = static_cast<const S*>(in.data);
  at::parallel_for(0, unit_tiles * word_tiles, 1, [&](int64_t b, int64_t e) {
    alignas(64) uint8_t flags[kSignTileUnits][kSignTileWords * kBitsPerWord];
    alignas(64) uint8_t block[kSignTileUnits * kTiledInner];
    const bool dense = in.inner_stride == 1 && in.unit_stride == in.inner;
    for (int64_t item = b; item < e; ++item) {
      const int64_t ut = item / word_tiles;
      const int64_t u0 = ut * kSignTileUnits;
      const int64_t nu = std::min(kSignTileUnits, in.units - u0);
      const int64_t w0 = (item - ut * word_tiles) * kSignTileWords;
      const int64_t w1 = std::min(words, w0 + kSignTileWords);
      const int64_t jb = w0 * kBitsPerWord;
      const int64_t je = std::min(bits, w1 * kBitsPerWord);
      for (int64_t o = jb / in.inner; o * in.inner < je; ++o) {
        const int64_t i_lo = std::max<int64_t>(0, jb - o * in.inner);
        const int64_t i_hi = std::min(in.inner, je - o * in.inner);
        const S* row = x + o * in.outer_stride + u0 * in.unit_stride;
        const int64_t k0 = o * in.inner - jb;  // flag index of (o, i = 0)
        if (dense) {  // the tile's units are one contiguous block of memory: compare it in one loop
          const int64_t n = nu * in.inner;
          for (int64_t t = 0; t < n; ++t) block[t] = is_positive(row[t]);  // vectorized
          if (in.inner == 1) {
            for (int64_t u = 0; u < nu; ++u) flags[u][k0] = block[u];
          } else {
            for (int64_t u = 0; u < nu; ++u) std::memcpy(flags[u] + k0 + i_lo, block + u * in.inner + i_lo, i_hi - i_lo);
          }
          continue;
        }
        for (int64_t u = 0; u < nu; ++u) {
          const S* p = row + u * in.unit_stride;
          uint8_t* f = flags[u] + k0;
          for (int64_t i = i_lo; i < i_hi; ++i) f[i] = is_positive(p[i * in.inner_stride]);
        }
      }
      const int64_t pad = (w1 - w0) * kBitsPerWord - (je - jb);
      for (int64_t u = 0; u < nu; ++u) {
        std::memset(flags[u] + (je - jb), 0, static_cast<size_t>(pad));
        pack_flags(flags[u], w0, w1, out + (u0 + u) * words);
      }
    }
  });
}

// Appends bits to one row of codes, a word at a time.
struct BitWriter {
  int64_t* out = nullptr;  // the next word to write
  uint64_t pending = 0;    // bits not yet written, in the low `count` bits
  int count = 0;           // < 64

  // Appends the n (1..64) low bits of w (the bits above n are zero).
  KF_INLINE void put(uint64_t w, int n) {
    pending |= w << count;
    if (count + n >= kBitsPerWord) {
      *out++ = static_cast<int64_t>(pending);
      pending = count == 0 ? 0 : w >> (kBitsPerWord - count);
      count = count + n - kBitsPerWord;
    } else {
      count += n;
    }
  }
  KF_INLINE void flush() {
    if (count > 0) *out++ = static_cast<int64_t>(pending);
    pending = 0;
    count = 0;
  }
};

// The flags of n <= 64 contiguous values as the low n bits of a word.
template <class S>
KF_INLINE uint64_t pack_run(const S* p, int64_t n) {
  alignas(64) uint8_t flags[kBitsPerWord];
  if (n == kBitsPerWord) {
    for (int k = 0; k < kBitsPerWord; ++k) flags[k] = is_positive(p[k]);  // vectorized
  } else {
    for (int64_t k = 0; k < n; ++k) flags[k] = is_positive(p[k]);
    std::memset(flags + n, 0, static_cast<size_t>(kBitsPerWord - n));
  }
  uint64_t word = 0;
  for (int byte = 0; byte < 8; ++byte) {
    uint64_t eight;
    std::memcpy(&eight, flags + 8 * byte, 8);
    word |= pack_flag_bytes(eight) << (8 * byte);
  }
  return word;
}

// Long contiguous rows (a BatchNorm2d output in NCHW: inner = H * W >= 64, inner stride 1): x is
// read in memory order, sample by sample, each unit's run appended to its row. A work item is a
// block of units x a block of samples that starts and ends on a word boundary of every row
// (o_align samples hold a whole number of words), so items never share a word. Reading in memory
// order keeps the hardware prefetcher busy: going unit by unit instead reads one page per run.
constexpr int64_t kStreamUnits = 16;
constexpr int64_t kStreamItemValues = int64_t{1} << 16;

template <class S>
void sign_codes_by_stream(const SignInput& in, int64_t* out) {
  const int64_t words = words_for_bits(in.bits());
  const int64_t o_align = kBitsPerWord / std::gcd(in.inner, kBitsPerWord);
  const int64_t per_o = kStreamUnits * in.inner;
  const int64_t o_block = o_align * std::max<int64_t>(1, kStreamItemValues / (per_o * o_align));
  const int64_t unit_blocks = (in.units + kStreamUnits - 1) / kStreamUnits;
  const int64_t o_blocks = (in.outer + o_block - 1) / o_block;
  const S* x = static_cast<const S*>(in.data);
  at::parallel_for(0, unit_blocks * o_blocks, 1, [&](int64_t b, int64_t e) {
    BitWriter rows[kStreamUnits];
    for (int64_t item = b; item < e; ++item) {
      const int64_t ub = item / o_blocks;
      const int64_t u0 = ub * kStreamUnits;
      const int64_t nu = std::min(kStreamUnits, in.units - u0);
      const int64_t o0 = (item - ub * o_blocks) * o_block;
      const int64_t o1 = std::min(in.outer, o0 + o_block);
      for (int64_t u = 0; u < nu; ++u) rows[u] = BitWriter{out + (u0 + u) * words + o0 * in.inner / kBitsPerWord};
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t u = 0; u < nu; ++u) {
          const S* p = x + o * in.outer_stride + (u0 + u) * in.unit_stride;
          int64_t i = 0;
          for (; i + kBitsPerWord <= in.inner; i += kBitsPerWord) rows[u].put(pack_run(p + i, kBitsPerWord), kBitsPerWord);
          if (i < in.inner) rows[u].put(pack_run(p + i, in.inner - i), static_cast<int>(in.inner - i));
        }
      }
      for (int64_t u = 0; u < nu; ++u) rows[u].flush();  // only the last item of a row has bits left
    }
  });
}

template <class S>
void sign_codes_cpu_impl(const SignInput& in, int64_t* out) {
  if (in.inner < kTiledInner) {
    sign_codes_by_tile<S>(in, out);
  } else if (in.inner_stride == 1) {
    sign_codes_by_stream<S>(in, out);
  } else {
    sign_codes_by_unit<S>(in, out);
  }
}

at::Tensor sign_codes_cpu(const at::Tensor& x, int64_t dim) {
  constexpr const char* op = "sign_codes";
  const SignCodesInput in = prepare_sign_codes(op, x, dim);
  at::Tensor codes = empty_codes(in, x);
  if (codes.numel() == 0) return codes;
  int64_t* out = codes.data_ptr<int64_t>();
  switch (in.dtype) {
    case c10::kHalf: sign_codes_cpu_impl<c10::Half>(in.view, out); break;
    case c10::kBFloat16: sign_codes_cpu_impl<c10::BFloat16>(in.view, out); break;
    case c10::kFloat: sign_codes_cpu_impl<float>(in.view, out); break;
    case c10::kDouble: sign_codes_cpu_impl<double>(in.view, out); break;
    case c10::kBool: sign_codes_cpu_impl<bool>(in.view, out); break;
    default: TORCH_CHECK(false, "koopfast::sign_codes: internal error: unchecked dtype");
  }
  return codes;
}

// ---- popcount loops, compiled with and without POPCNT ---------------------------------------------

KF_INLINE uint64_t popcount64(int64_t w) { return static_cast<uint64_t>(__builtin_popcountll(static_cast<uint64_t>(w))); }

// Sum over k < n of popcount(a[k*sa] ^ b[k*sb]), or of popcount(a[k*sa]) when b is null.
KF_INLINE uint64_t row_popcount_impl(const int64_t* a, int64_t sa, const int64_t* b, int64_t sb, int64_t n) {
  uint64_t c0 = 0, c1 = 0;
  if (b == nullptr) {
    if (sa == 1) {
      int64_t k = 0;
      for (; k + 1 < n; k += 2) {
        c0 += popcount64(a[k]);
        c1 += popcount64(a[k + 1]);
      }
      if (k < n) c0 += popcount64(a[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) c0 += popcount64(a[k * sa]);
    }
  } else if (sa == 1 && sb == 1) {
    int64_t k = 0;
    for (; k + 1 < n; k += 2) {
      c0 += popcount64(a[k] ^ b[k]);
      c1 += popcount64(a[k + 1] ^ b[k + 1]);
    }
    if (k < n) c0 += popcount64(a[k] ^ b[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) c0 += popcount64(a[k * sa] ^ b[k * sb]);
  }
  return c0 + c1;
}

constexpr int64_t kPairTile = 16;        // pairwise_hamming: rows per tile
constexpr int64_t kPairTileWords = 512;  // words per step over k (2 x 16 rows x 4 KiB stay in L1/L2)

// acc[i][j] += distance of rows a + i*words and b + j*words over words [k0, k1); 4x4 blocks.
KF_INLINE void pair_tile_impl(const int64_t* a, int64_t ni, const int64_t* b, int64_t nj, int64_t words, int64_t k0,
                              int64_t k1, uint64_t (*acc)[kPairTile]) {
  int64_t i = 0;
  for (; i + 4 <= ni; i += 4) {
    const int64_t* a0 = a + i * words;
    int64_t j = 0;
    for (; j + 4 <= nj; j += 4) {
      const int64_t* b0 = b + j * words;
      uint64_t s[4][4] = {};
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t x[4] = {a0[k], a0[words + k], a0[2 * words + k], a0[3 * words + k]};
        const int64_t y[4] = {b0[k], b0[words + k], b0[2 * words + k], b0[3 * words + k]};
        for (int p = 0; p < 4; ++p)
          for (int q = 0; q < 4; ++q) s[p][q] += popcount64(x[p] ^ y[q]);
      }
      for (int p = 0; p < 4; ++p)
        for (int q = 0; q < 4; ++q) acc[i + p][j + q] += s[p][q];
    }
    for (; j < nj; ++j)
      for (int p = 0; p < 4; ++p)
        acc[i + p][j] += row_popcount_impl(a0 + p * words + k0, 1, b + j * words + k0, 1, k1 - k0);
  }
  for (; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j)
      acc[i][j] += row_popcount_impl(a + i * words + k0, 1, b + j * words + k0, 1, k1 - k0);
}

uint64_t row_popcount_generic(const int64_t* a, int64_t sa, const int64_t* b, int64_t sb, int64_t n) {
  return row_popcount_impl(a, sa, b, sb, n);
}
void pair_tile_generic(const int64_t* a, int64_t ni, const int64_t* b, int64_t nj, int64_t words, int64_t k0, int64_t k1,
                       uint64_t (*acc)[kPairTile]) {
  pair_tile_impl(a, ni, b, nj, words, k0, k1, acc);
}
#if KF_HAS_POPCNT_DISPATCH
KF_POPCNT_TARGET uint64_t row_popcount_popcnt(const int64_t* a, int64_t sa, const int64_t* b, int64_t sb, int64_t n) {
  return row_popcount_impl(a, sa, b, sb, n);
}
KF_POPCNT_TARGET void pair_tile_popcnt(const int64_t* a, int64_t ni, const int64_t* b, int64_t nj, int64_t words,
                                       int64_t k0, int64_t k1, uint64_t (*acc)[kPairTile]) {
  pair_tile_impl(a, ni, b, nj, words, k0, k1, acc);
}
#endif

struct PopcountFns {
  uint64_t (*row)(const int64_t*, int64_t, const int64_t*, int64_t, int64_t);
  void (*tile)(const int64_t*, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t, uint64_t (*)[kPairTile]);
};

const PopcountFns& popcount_fns() {
  static const PopcountFns fns = [] {
#if KF_HAS_POPCNT_DISPATCH
    if (__builtin_cpu_supports("popcnt")) return PopcountFns{&row_popcount_popcnt, &pair_tile_popcnt};
#endif
    return PopcountFns{&row_popcount_generic, &pair_tile_generic};
  }();
  return fns;
}

// ---- hamming_distance ---------------------------------------------------------------------------

std::vector<at::Tensor> hamming_distance_cpu(at::TensorList a, at::TensorList b) {
  constexpr const char* op = "hamming_distance";
  const HammingInputs in = prepare_hamming(op, a, b);
  std::vector<at::Tensor> out;
  std::vector<int64_t*> dst;
  for (size_t t = 0; t < a.size(); ++t) {
    out.push_back(at::zeros({in.a[t].rows}, a[t].options().dtype(c10::kLong)));
    dst.push_back(out.back().data_ptr<int64_t>());
  }
  const std::vector<CodeChunk> chunks = make_code_chunks(in.a);
  const auto row_popcount = popcount_fns().row;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const CodeChunk& ch = chunks[c];
      const CodeMatrix& ma = in.a[ch.tensor];
      const CodeMatrix* mb = in.b.empty() ? nullptr : &in.b[ch.tensor];
      const bool whole_rows = ch.word_begin == 0 && ch.word_end == ma.words;
      for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
        const int64_t* pa = ma.data + r * ma.row_stride + ch.word_begin * ma.word_stride;
        const int64_t* pb = mb ? mb->data + r * mb->row_stride + ch.word_begin * mb->word_stride : nullptr;
        const auto count = static_cast<int64_t>(
            row_popcount(pa, ma.word_stride, pb, mb ? mb->word_stride : 0, ch.word_end - ch.word_begin));
        if (whole_rows) {
          dst[ch.tensor][r] = count;  // this chunk is the row's only one
        } else {
          __atomic_fetch_add(&dst[ch.tensor][r], count, __ATOMIC_RELAXED);
        }
      }
    }
  });
  return out;
}

// ---- pairwise_hamming ---------------------------------------------------------------------------

at::Tensor pairwise_hamming_cpu(const at::Tensor& codes) {
  constexpr const char* op = "pairwise_hamming";
  code_matrix(op, codes, "codes");
  // Each row is read once per tile of other rows: a contiguous copy first costs one pass and keeps
  // every later read sequential.
  const at::Tensor c = codes.contiguous();
  const int64_t units = c.size(0);
  const int64_t words = c.size(1);
  at::Tensor out = at::empty({units, units}, codes.options().dtype(c10::kLong));
  if (units == 0) return out;
  const int64_t* data = c.data_ptr<int64_t>();
  int64_t* d = out.data_ptr<int64_t>();
  const int64_t tiles = (units + kPairTile - 1) / kPairTile;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (I, J) with I <= J: the upper triangle of tiles
  for (int64_t I = 0; I < tiles; ++I)
    for (int64_t J = I; J < tiles; ++J) pairs.emplace_back(I, J);
  const auto tile_fn = popcount_fns().tile;
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t pb, int64_t pe) {
    uint64_t acc[kPairTile][kPairTile];
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t i0 = pairs[p].first * kPairTile, j0 = pairs[p].second * kPairTile;
      const int64_t ni = std::min(kPairTile, units - i0), nj = std::min(kPairTile, units - j0);
      std::memset(acc, 0, sizeof(acc));
      for (int64_t k0 = 0; k0 < words; k0 += kPairTileWords) {
        tile_fn(data + i0 * words, ni, data + j0 * words, nj, words, k0, std::min(words, k0 + kPairTileWords), acc);
      }
      for (int64_t i = 0; i < ni; ++i) {
        for (int64_t j = 0; j < nj; ++j) {
          d[(i0 + i) * units + (j0 + j)] = static_cast<int64_t>(acc[i][j]);
          d[(j0 + j) * units + (i0 + i)] = static_cast<int64_t>(acc[i][j]);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CPU, m) {
  m.impl("sign_codes", &sign_codes_cpu);
  m.impl("hamming_distance", &hamming_distance_cpu);
  m.impl("pairwise_hamming", &pairwise_hamming_cpu);
}

}  // namespace koopfast
