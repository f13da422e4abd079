// Semi-structured (N:M) selection: in every group of M consecutive entries along the last
// dimension of a [rows, cols] score matrix, keep the N largest scores. Torch-free, shared by the
// CPU and CUDA backends.
//
// The contract (the reference twin koopfast.reference.nm_masks states the same):
// - groups are columns [g*M, (g+1)*M) of each row; a trailing group of r < M columns keeps
//   min(N, r) entries;
// - among equal scores the lower column index is kept, so exactly N (or min(N, r)) are kept in
//   every group whatever the ties; -0 and +0 are equal;
// - scores are computed in the compute type C (float64 if any input is float64, else float32),
//   as the selection ops compute them; a NaN score is reported (the tensor index) instead.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace koopfast {

// Does entry i of the group s[0, len) rank among its `keep` largest (ties: lower index first)?
// O(len) per entry: groups are short (M is 4, 8, 16, ...), and the loop has no branch to mispredict.
template <class C>
KF_HOST_DEVICE KF_INLINE bool nm_kept(const C* s, int64_t len, int64_t keep, int64_t i) {
  const C x = s[i];
  int64_t ahead = 0;  // entries that rank before i
  for (int64_t j = 0; j < len; ++j) {
    ahead += (s[j] > x) | ((s[j] == x) & (j < i));
  }
  return ahead < keep;
}

KF_HOST_DEVICE constexpr int64_t nm_group_keep(int64_t n, int64_t m, int64_t len) {
  return len < m ? (n < len ? n : len) : n;
}

}  // namespace koopfast
