// CPU backend of nm_masks: rows in parallel (at::parallel_for); each row's scores are computed
// once into a buffer (for_each_score_of: any strides, any dtype and score kind), then each group
// is selected by rank counting (select/nm.h). Work items are whole rows: results do not depend on
// the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <vector>

#include "common/cpu_loops.h"
#include "select/nm.h"
#include "select/nm_args.h"

namespace koopfast {
namespace {

template <class C>
void nm_tensor(const NmInputs& in, size_t t, bool* out, std::atomic<int64_t>& first_nan) {
  const TensorView& a = in.scores.a[t];
  const TensorView* b = in.scores.b.empty() ? nullptr : &in.scores.b[t];
  const int64_t rows = in.rows[t], cols = in.cols[t];
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<C> row(static_cast<size_t>(cols));
    for (int64_t r = r0; r < r1; ++r) {
      for_each_score_of<C>(in.scores.kind, a, b, r * cols, (r + 1) * cols, [&](const C* s, int64_t n, int64_t flat) {
        std::copy(s, s + n, row.data() + (flat - r * cols));
      });
      bool nan = false;
      for (int64_t j = 0; j < cols; ++j) nan |= std::isnan(row[j]);
      if (nan) {
        int64_t cur = first_nan.load();
        while (static_cast<int64_t>(t) < cur && !first_nan.compare_exchange_weak(cur, static_cast<int64_t>(t))) {
        }
        continue;
      }
      bool* o = out + r * cols;
      for (int64_t g = 0; g < cols; g += in.m) {
        const int64_t len = std::min(in.m, cols - g);
        const int64_t keep = nm_group_keep(in.n, in.m, len);
        for (int64_t i = 0; i < len; ++i) o[g + i] = nm_kept(row.data() + g, len, keep, i);
      }
    }
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> nm_masks_cpu(at::TensorList a, at::TensorList b,
                                                             std::string_view score, int64_t n, int64_t m) {
  const NmInputs in = prepare_nm_inputs("nm_masks", a, b, score, n, m);
  std::vector<at::Tensor> out = empty_nm_masks(in, a[0]);
  std::atomic<int64_t> first_nan{INT64_MAX};
  for (size_t t = 0; t < out.size(); ++t) {
    bool* dst = out[t].data_ptr<bool>();
    if (in.scores.wide) {
      nm_tensor<double>(in, t, dst, first_nan);
    } else {
      nm_tensor<float>(in, t, dst, first_nan);
    }
  }
  at::Tensor status = at::empty({1}, a[0].options().dtype(c10::kLong));
  status.data_ptr<int64_t>()[0] = first_nan.load() == INT64_MAX ? -1 : first_nan.load();
  return {out, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CPU, m) { m.impl("nm_masks", &nm_masks_cpu); }

}  // namespace koopfast
