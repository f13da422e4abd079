// Threshold selection: the exact k-th largest score over the union of many tensors.
//
// Torch-free pieces shared by the CPU and CUDA backends: how a score is computed from one or two
// operands, the order-preserving map from scores to unsigned radix keys, and one step of the
// most-significant-digit radix descent. The backends differ only in how they fill histograms.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#include "common/macros.h"
#include "common/score.h"

namespace koopfast {

// ---- radix keys: larger score <=> larger key ------------------------------------------------------
// -0 is mapped to +0 first, so the two zeros are one value (ties broken by position, like equal
// values). NaN gets a key too, but callers report NaN instead of selecting.
template <class C>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

template <class C>
KF_HOST_DEVICE KF_INLINE typename KeyOf<C>::type to_key(C x) {
  using K = typename KeyOf<C>::type;
  constexpr int kTop = 8 * sizeof(K) - 1;
  if (x == C(0)) x = C(0);
  K u;
  memcpy(&u, &x, sizeof(K));
  return (u >> kTop) ? K(~u) : K(u | (K(1) << kTop));
}

template <class C>
KF_HOST_DEVICE KF_INLINE C from_key(typename KeyOf<C>::type k) {
  using K = typename KeyOf<C>::type;
  constexpr int kTop = 8 * sizeof(K) - 1;
  const K u = (k >> kTop) ? K(k & ~(K(1) << kTop)) : K(~k);
  C x;
  memcpy(&x, &u, sizeof(K));
  return x;
}

// ---- range narrowing (a most-significant-digit radix select on key ranges) --------------------------
// The target, the k_rem-th largest key among the keys in [lo, hi], is found by histogramming those
// keys in at most 2^width bins of 2^shift consecutive keys each and keeping the bin that holds it.
// Starting from the full key range this is the classic radix select; starting from a range
// guessed from a sample, it skips the leading digits (see select_cpu.cpp).
template <class K>
struct RangeState {
  K lo = 0;
  K hi = ~K(0);
  int64_t k_rem = 0;      // 1-based rank of the target among keys in [lo, hi]
  int64_t n_greater = 0;  // keys known to be strictly greater than the target
  int64_t n_bucket = 0;   // keys in [lo, hi] (after the last pass: keys equal to the target)

  KF_HOST_DEVICE bool done() const { return lo == hi; }
};

// Histogram geometry of the next pass over [lo, hi]: bin of key = (key - lo) >> shift.
template <class K>
struct RangeBins {
  int32_t shift = 0;
  int64_t count = 1;
};

template <class K>
KF_HOST_DEVICE inline RangeBins<K> range_bins(const RangeState<K>& st, int width) {
  const K span = st.hi - st.lo;
  int bits = 0;  // bit width of span
  while (bits < static_cast<int>(8 * sizeof(K)) && (span >> bits) != 0) ++bits;
  RangeBins<K> g;
  g.shift = bits > width ? bits - width : 0;
  g.count = static_cast<int64_t>(span >> g.shift) + 1;
  return g;
}

// Keeps the bin holding the k_rem-th largest of the keys counted in hist (hist[i]: keys in
// [lo, hi] whose bin is i). Requires 1 <= k_rem <= sum(hist).
template <class K, class Count>
KF_HOST_DEVICE inline void range_descend(RangeState<K>& st, const Count* hist, const RangeBins<K>& g) {
  int64_t above = 0;
  int64_t b = g.count - 1;
  for (; b > 0; --b) {
    if (above + static_cast<int64_t>(hist[b]) >= st.k_rem) break;
    above += static_cast<int64_t>(hist[b]);
  }
  st.k_rem -= above;
  st.n_greater += above;
  st.n_bucket = static_cast<int64_t>(hist[b]);
  const K new_lo = st.lo + (K(b) << g.shift);
  const K width_m1 = g.shift == 0 ? K(0) : K((K(1) << g.shift) - 1);
  st.hi = (st.hi - new_lo) > width_m1 ? K(new_lo + width_m1) : st.hi;
  st.lo = new_lo;
}

// Moves a state to the part of its key range that holds the target, given how many keys lie
// above hi and inside [lo, hi]. Used when a guessed range turns out not to hold the target.
template <class K>
KF_HOST_DEVICE inline void range_retarget(RangeState<K>& st, int64_t k, int64_t above, int64_t inside) {
  if (k <= above) {  // the target is above the range
    st.lo = st.hi + 1;
    st.hi = ~K(0);
    st.k_rem = k;
    st.n_greater = 0;
  } else {  // below it
    st.hi = st.lo - 1;
    st.lo = 0;
    st.k_rem = k - above - inside;
    st.n_greater = above + inside;
  }
}

// Output layout of `stats` (int64): see the schema in csrc/registration.cpp.
enum SelectStat : int32_t { kNumGreater = 0, kNumEqual = 1, kNumTiesKept = 2, kNanTensor = 3, kNumSelectStats = 4 };

}  // namespace koopfast
