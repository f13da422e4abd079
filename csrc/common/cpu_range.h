// Which scores of one block lie in a closed range [lo, hi], as bit masks, with the counts of
// scores above the range and of NaNs: the inner loop of the CPU selection passes.
//
// Compiled for x86-64-v3 (AVX2) and the baseline, picked at load time (GCC target_clones); the
// results are comparisons only, so both clones give identical answers. The bits come from byte
// flags gathered eight at a time with one multiplication, so that a sparse consumer (candidates
// of a narrow range) visits only the set bits instead of testing every flag.
#pragma once

#include <cstdint>

#include "common/cpu_loops.h"

namespace koopfast {

struct RangeFlags {
  static constexpr int kWords = kScoreBlock / 64;
  uint32_t above = 0;   // scores > hi
  uint32_t inside = 0;  // scores in [lo, hi]
  uint32_t nan = 0;     // NaN scores (neither above nor inside)
  uint64_t bits[kWords] = {};  // bit j % 64 of word j / 64: score j is inside; zero past m
};

// Fills f for the m <= kScoreBlock scores s[0, m).
void flag_range(const float* s, int64_t m, float lo, float hi, RangeFlags& f);
void flag_range(const double* s, int64_t m, double lo, double hi, RangeFlags& f);

}  // namespace koopfast
