#include "common/cpu_range.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KF_SIMD_CLONES
#endif

namespace koopfast {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "gather8 reads flag bytes as a little-endian word");

// Eight 0/1 bytes (byte i of the little-endian word) -> an 8-bit mask with bit i = byte i: the
// product adds byte i's bit times 2^(56 + i) into the top byte, without carries.
inline uint64_t gather8(uint64_t bytes) { return (bytes * 0x0102040810204080ull) >> 56; }

template <class C>
inline void flag_range_impl(const C* s, int64_t m, C lo, C hi, RangeFlags& f) {
  alignas(64) uint8_t flag[kScoreBlock];
  uint32_t above = 0, inside = 0, nan = 0;
  for (int64_t j = 0; j < m; ++j) {  // vectorized: compares and byte stores only
    const uint8_t in = (s[j] >= lo) & (s[j] <= hi);
    flag[j] = in;
    inside += in;
    above += s[j] > hi;
    nan += s[j] != s[j];
  }
  f.above = above;
  f.inside = inside;
  f.nan = nan;
  if (inside == 0) {
    for (int w = 0; w < RangeFlags::kWords; ++w) f.bits[w] = 0;
    return;
  }
  for (int64_t j = m; j < kScoreBlock; ++j) flag[j] = 0;
  for (int w = 0; w < RangeFlags::kWords; ++w) {
    uint64_t bits = 0;
    for (int q = 0; q < 8; ++q) {
      uint64_t bytes;
      memcpy(&bytes, flag + 64 * w + 8 * q, 8);
      bits |= gather8(bytes) << (8 * q);
    }
    f.bits[w] = bits;
  }
}

}  // namespace

KF_SIMD_CLONES void flag_range(const float* s, int64_t m, float lo, float hi, RangeFlags& f) {
  flag_range_impl(s, m, lo, hi, f);
}
KF_SIMD_CLONES void flag_range(const double* s, int64_t m, double lo, double hi, RangeFlags& f) {
  flag_range_impl(s, m, lo, hi, f);
}

}  // namespace koopfast
