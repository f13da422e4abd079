// Host loops over (pairs of) strided tensors, shared by the CPU kernels of every family.
#pragma once

#include <cstdint>

#include "common/dispatch.h"
#include "common/tensor_view.h"

namespace koopfast {

// body(offset_a, stride_a, offset_b, stride_b, count, flat_begin) over runs of [begin, end) in
// which a and b (b may be null: then b mirrors a) are both evenly strided.
template <class F>
inline void for_each_pair_run(const TensorView& a, const TensorView* b, int64_t begin, int64_t end, F&& body) {
  for_each_run(a, begin, end, [&](int64_t oa, int64_t sa, int64_t n, int64_t flat) {
    if (b == nullptr) {
      body(oa, sa, oa, sa, n, flat);
      return;
    }
    for_each_run(*b, flat, flat + n, [&](int64_t ob, int64_t sb, int64_t m, int64_t flat2) {
      body(oa + (flat2 - flat) * sa, sa, ob, sb, m, flat2);
    });
  });
}

constexpr int64_t kScoreBlock = 256;

// f(scores, count, i0) for the n scores of one run, kScoreBlock at a time: scores are computed
// into a small buffer first, so that both this loop and the consumer's loop over the buffer
// vectorize (a consumer with a rare scatter, such as a histogram of candidates, stays cheap).
template <ScoreKind K, class C, class S, class F>
KF_INLINE void for_each_score_block(const S* a, int64_t sa, const S* b, int64_t sb, int64_t n, F&& f) {
  C buf[kScoreBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kScoreBlock) {
    const int64_t m = n - i0 < kScoreBlock ? n - i0 : kScoreBlock;
    if (sa == 1 && sb == 1) {
      const S* pa = a + i0;
      const S* pb = b + i0;
      for (int64_t j = 0; j < m; ++j) buf[j] = score_of<K, C>(widen<C>(pa[j]), widen<C>(pb[j]));
    } else {
      const S* pa = a + i0 * sa;
      const S* pb = b + i0 * sb;
      for (int64_t j = 0; j < m; ++j) buf[j] = score_of<K, C>(widen<C>(pa[j * sa]), widen<C>(pb[j * sb]));
    }
    f(static_cast<const C*>(buf), m, i0);
  }
}

// f(scores, count, flat) over the scores of elements [begin, end) of the pair (a, b), in flat
// order, in blocks of at most kScoreBlock; scores[j] belongs to flat index flat + j. The one
// place where the CPU kernels dispatch on dtype and score kind.
template <class C, class F>
inline void for_each_score_of(ScoreKind kind, const TensorView& a, const TensorView* b, int64_t begin, int64_t end,
                              F&& f) {
  dispatch_float(a.dtype, [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch_score(kind, [&](auto ktag) {
      constexpr ScoreKind K = decltype(ktag)::value;
      const S* pa = static_cast<const S*>(a.data);
      const S* pb = b ? static_cast<const S*>(b->data) : pa;
      for_each_pair_run(a, b, begin, end, [&](int64_t oa, int64_t sa, int64_t ob, int64_t sb, int64_t n, int64_t flat) {
        for_each_score_block<K, C, S>(pa + oa, sa, pb + ob, sb, n,
                                      [&](const C* s, int64_t m, int64_t i0) { f(s, m, flat + i0); });
      });
    });
  });
}

}  // namespace koopfast
