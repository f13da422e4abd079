#include "select/filter_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KF_HAS_AVX2_FILTER 1
#else
#define KF_HAS_AVX2_FILTER 0
#endif

namespace koopfast {

#if KF_HAS_AVX2_FILTER
namespace {

#define KF_AVX2 __attribute__((target("avx2,popcnt")))

// kPack[m]: the lanes set in the 8-bit mask m, first, in order (left-packing by a permutation).
struct PackTable {
  alignas(32) uint32_t lanes[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j) {
        if ((m >> j) & 1) lanes[m][c++] = static_cast<uint32_t>(j);
      }
      for (; c < 8; ++c) lanes[m][c] = 0;
    }
  }
};
const PackTable kPack;

template <ScoreKind K>
KF_AVX2 inline __m256 score8(const float* a, const float* b) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 x = _mm256_loadu_ps(a);
  if constexpr (K == ScoreKind::Value) {
    return x;
  } else if constexpr (K == ScoreKind::Abs) {
    return _mm256_and_ps(x, magnitude);
  } else if constexpr (K == ScoreKind::Product) {
    return _mm256_mul_ps(x, _mm256_loadu_ps(b));
  } else if constexpr (K == ScoreKind::AbsProduct) {
    return _mm256_and_ps(_mm256_mul_ps(x, _mm256_loadu_ps(b)), magnitude);
  } else {
    return _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_and_ps(_mm256_loadu_ps(b), magnitude));
  }
}

KF_AVX2 inline int64_t lane_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

template <ScoreKind K, bool Store>
KF_AVX2 void filter_avx2(const float* a, const float* b, int64_t n, float lo, float hi, float* out,
                         FilterCounts& counts) {
  const __m256 vlo = _mm256_set1_ps(lo);
  const __m256 vhi = _mm256_set1_ps(hi);
  int64_t stored = 0;
  int64_t i = 0;
  // 32-bit lane counters (a compare's all-ones lane is -1), flushed before they could overflow.
  constexpr int64_t kFlush = int64_t{1} << 30;
  while (i + 8 <= n) {
    __m256i above = _mm256_setzero_si256();
    __m256i nan = _mm256_setzero_si256();
    const int64_t stop = (n - i) / 8 * 8 < kFlush ? i + (n - i) / 8 * 8 : i + kFlush;
    for (; i < stop; i += 8) {
      const __m256 s = score8<K>(a + i, b + i);
      above = _mm256_sub_epi32(above, _mm256_castps_si256(_mm256_cmp_ps(s, vhi, _CMP_GT_OQ)));
      nan = _mm256_sub_epi32(nan, _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));
      const __m256 in = _mm256_and_ps(_mm256_cmp_ps(s, vlo, _CMP_GE_OQ), _mm256_cmp_ps(s, vhi, _CMP_LE_OQ));
      const int mask = _mm256_movemask_ps(in);
      if constexpr (Store) {
        const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.lanes[mask]));
        _mm256_storeu_ps(out + stored, _mm256_permutevar8x32_ps(s, lanes));
      }
      stored += __builtin_popcount(static_cast<unsigned>(mask));
    }
    counts.above += lane_sum(above);
    counts.nan += lane_sum(nan);
  }
  for (; i < n; ++i) {
    const float s = score_of<K, float>(a[i], b[i]);
    counts.above += s > hi;
    counts.nan += s != s;
    if (s >= lo && s <= hi) {
      if constexpr (Store) out[stored] = s;
      ++stored;
    }
  }
  counts.inside += stored;
}

template <ScoreKind K>
KF_AVX2 void filter_kind(const float* a, const float* b, int64_t n, float lo, float hi, float* out,
                         FilterCounts& counts) {
  out != nullptr ? filter_avx2<K, true>(a, b, n, lo, hi, out, counts)
                 : filter_avx2<K, false>(a, b, n, lo, hi, out, counts);
}

KF_AVX2 void filter(ScoreKind kind, const float* a, const float* b, int64_t n, float lo, float hi, float* out,
                    FilterCounts& counts) {
  switch (kind) {
    case ScoreKind::Value: return filter_kind<ScoreKind::Value>(a, b, n, lo, hi, out, counts);
    case ScoreKind::Abs: return filter_kind<ScoreKind::Abs>(a, b, n, lo, hi, out, counts);
    case ScoreKind::Product: return filter_kind<ScoreKind::Product>(a, b, n, lo, hi, out, counts);
    case ScoreKind::AbsProduct: return filter_kind<ScoreKind::AbsProduct>(a, b, n, lo, hi, out, counts);
    case ScoreKind::SquareTimesAbs: return filter_kind<ScoreKind::SquareTimesAbs>(a, b, n, lo, hi, out, counts);
  }
}

// 32 compare results (four vectors of 32-bit all-ones or zero lanes) as 32 bytes 1 or 0, in order.
KF_AVX2 inline __m256i bytes_of(__m256 c0, __m256 c1, __m256 c2, __m256 c3) {
  const __m256i p01 = _mm256_packs_epi32(_mm256_castps_si256(c0), _mm256_castps_si256(c1));
  const __m256i p23 = _mm256_packs_epi32(_mm256_castps_si256(c2), _mm256_castps_si256(c3));
  const __m256i b = _mm256_packs_epi16(p01, p23);  // lane-interleaved: undo with a permutation
  const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return _mm256_and_si256(ordered, _mm256_set1_epi8(1));
}

template <ScoreKind K, bool KeepTies>
KF_AVX2 int64_t mask_avx2(const float* a, const float* b, int64_t n, float threshold, bool* out) {
  const __m256 thr = _mm256_set1_ps(threshold);
  constexpr int kCmp = KeepTies ? _CMP_GE_OQ : _CMP_GT_OQ;
  int64_t ties = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 s[4];
    for (int q = 0; q < 4; ++q) s[q] = score8<K>(a + i + 8 * q, b + i + 8 * q);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        bytes_of(_mm256_cmp_ps(s[0], thr, kCmp), _mm256_cmp_ps(s[1], thr, kCmp),
                                 _mm256_cmp_ps(s[2], thr, kCmp), _mm256_cmp_ps(s[3], thr, kCmp)));
    if constexpr (!KeepTies) {
      for (int q = 0; q < 4; ++q) {
        ties += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(s[q], thr, _CMP_EQ_OQ))));
      }
    }
  }
  for (; i < n; ++i) {
    const float s = score_of<K, float>(a[i], b[i]);
    out[i] = KeepTies ? s >= threshold : s > threshold;
    if constexpr (!KeepTies) ties += s == threshold;
  }
  return ties;
}

template <ScoreKind K>
KF_AVX2 int64_t mask_kind(const float* a, const float* b, int64_t n, float threshold, bool keep_ties, bool* out) {
  return keep_ties ? mask_avx2<K, true>(a, b, n, threshold, out) : mask_avx2<K, false>(a, b, n, threshold, out);
}

KF_AVX2 int64_t mask(ScoreKind kind, const float* a, const float* b, int64_t n, float threshold, bool keep_ties,
                     bool* out) {
  switch (kind) {
    case ScoreKind::Value: return mask_kind<ScoreKind::Value>(a, b, n, threshold, keep_ties, out);
    case ScoreKind::Abs: return mask_kind<ScoreKind::Abs>(a, b, n, threshold, keep_ties, out);
    case ScoreKind::Product: return mask_kind<ScoreKind::Product>(a, b, n, threshold, keep_ties, out);
    case ScoreKind::AbsProduct: return mask_kind<ScoreKind::AbsProduct>(a, b, n, threshold, keep_ties, out);
    case ScoreKind::SquareTimesAbs: return mask_kind<ScoreKind::SquareTimesAbs>(a, b, n, threshold, keep_ties, out);
  }
  return 0;
}

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"); }

}  // namespace

FilterFn fast_filter() {
  static const FilterFn fn = has_avx2() ? &filter : nullptr;
  return fn;
}

MaskFn fast_mask() {
  static const MaskFn fn = has_avx2() ? &mask : nullptr;
  return fn;
}

#else

FilterFn fast_filter() { return nullptr; }
MaskFn fast_mask() { return nullptr; }

#endif

}  // namespace koopfast
