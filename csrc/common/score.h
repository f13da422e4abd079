// How an element's score is computed from one or two operands: shared by selection (the k-th
// largest score) and by the kernels that threshold or mask by a score. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace koopfast {

// Score of an element from operands a (and b). Computed in the compute type C: float64 if any
// input tensor is float64, else float32, so that a reference computed by torch in C agrees bit
// for bit. Products are evaluated left to right: (a*a)*|b|.
enum class ScoreKind : int32_t { Value = 0, Abs = 1, Product = 2, AbsProduct = 3, SquareTimesAbs = 4 };
constexpr int kNumScoreKinds = 5;

KF_HOST_DEVICE constexpr bool score_is_binary(ScoreKind k) {
  return k == ScoreKind::Product || k == ScoreKind::AbsProduct || k == ScoreKind::SquareTimesAbs;
}

// fabs, not a comparison: a sign test compiles to a branch that random signs mispredict (4x slower).
KF_HOST_DEVICE KF_INLINE float abs_of(float x) { return fabsf(x); }
KF_HOST_DEVICE KF_INLINE double abs_of(double x) { return fabs(x); }

template <ScoreKind K, class C>
KF_HOST_DEVICE KF_INLINE C score_of(C a, C b) {
  if constexpr (K == ScoreKind::Value) {
    return a;
  } else if constexpr (K == ScoreKind::Abs) {
    return abs_of(a);
  } else if constexpr (K == ScoreKind::Product) {
    return a * b;
  } else if constexpr (K == ScoreKind::AbsProduct) {
    return abs_of(a * b);
  } else {
    return (a * a) * abs_of(b);
  }
}

}  // namespace koopfast
