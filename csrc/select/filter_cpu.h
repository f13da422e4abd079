// The vector loops of CPU selection (see select_cpu.cpp) over float32 scores, at close to the
// memory bandwidth: the filtering pass (count the scores above a range, copy those inside it) and
// the mask pass (compare with the threshold, write bytes).
//
// A scan that histograms every element runs at about one element per nanosecond and core; one that
// only compares and left-packs the few elements of a guessed range (AVX2 compares, a movemask and a
// permutation from a 256-entry table, no branch per element) reads as fast as a streaming sum. The
// candidates it keeps are then selected among on their own, a few percent of the input.
#pragma once

#include <cstdint>

#include "common/score.h"

namespace koopfast {

struct FilterCounts {
  int64_t above = 0;   // scores > hi
  int64_t inside = 0;  // scores in [lo, hi] (all counted, stored or not)
  int64_t nan = 0;     // NaN scores
};

// Scores of n contiguous float32 elements: score_of<kind>(a[i], b[i]) (b is ignored by unary
// kinds), compared with [lo, hi]. If out is not null, the scores inside the range are stored at
// out[0, inside) in order, and out must have room for n + 8 floats (whole vectors are stored).
// Adds to counts. Rounds exactly like score_of (no fused multiply-add).
using FilterFn = void (*)(ScoreKind kind, const float* a, const float* b, int64_t n, float lo, float hi, float* out,
                          FilterCounts& counts);

// The AVX2 filter where the CPU has AVX2, else null (callers then take the histogram path, which is
// faster than a scalar filter).
FilterFn fast_filter();

// The mask pass's inner loop over n contiguous float32 elements: out[i] = score > threshold, or
// score >= threshold if keep_ties; returns the number of scores equal to the threshold (counted only
// if !keep_ties, else 0). 32 scores per step, 32-byte stores.
using MaskFn = int64_t (*)(ScoreKind kind, const float* a, const float* b, int64_t n, float threshold, bool keep_ties,
                           bool* out);

// The AVX2 mask loop where the CPU has AVX2, else null (callers then take the compiler-vectorized loop).
MaskFn fast_mask();

}  // namespace koopfast
