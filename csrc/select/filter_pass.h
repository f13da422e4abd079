// One filtering pass over the float32 scores of many tensors at once (CPU): tensor t belongs to
// segment segment_of[t] (or to none: -1), and each segment has its own score range [lo, hi]. Per
// segment, the scores above its range are counted and those inside it kept, up to a cap per
// segment; the first tensor holding a NaN score is found. Global selection filters one segment,
// select_threshold_per_tensor one segment per tensor, all tensors in the same pass.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common/chunks.h"
#include "common/cpu_loops.h"
#include "select/filter_cpu.h"
#include "select/select_args.h"

namespace koopfast {

struct FilterSegment {
  float lo = 0;
  float hi = 0;
  int64_t cap = 0;  // at most this many scores are kept
};

struct FilteredSegment {
  FilterCounts counts;
  int64_t nan_tensor = -1;       // first of the segment's tensors with a NaN score (its rank among them), or -1
  bool complete = true;          // every score inside the range was kept
  std::vector<TensorView> kept;  // the kept scores (contiguous float32 views into the pass's buffers)
};

class FilterPass {
 public:
  FilterPass(const SelectInputs& in, std::vector<int64_t> segment_of, std::vector<FilterSegment> segments,
             FilterFn filter)
      : in_(in), segment_of_(std::move(segment_of)), segments_(std::move(segments)), filter_(filter) {}

  // The kept views point into this object's buffers: they live as long as it does.
  std::vector<FilteredSegment> run() {
    const size_t nseg = segments_.size();
    const int nthreads = at::get_num_threads();
    std::vector<Chunk> chunks;
    for (const Chunk& ch : make_chunks(in_.a)) {
      if (segment_of_[ch.tensor] >= 0) chunks.push_back(ch);
    }
    std::unique_ptr<std::atomic<int64_t>[]> kept_total(new std::atomic<int64_t>[nseg]);
    std::unique_ptr<std::atomic<int64_t>[]> first_nan(new std::atomic<int64_t>[nseg]);
    for (size_t s = 0; s < nseg; ++s) {
      kept_total[s] = 0;
      first_nan[s] = std::numeric_limits<int64_t>::max();
    }
    std::vector<int64_t> rank(segment_of_.size(), 0);  // of a tensor among its segment's tensors
    std::vector<int64_t> tensors_in(nseg, 0);
    for (size_t t = 0; t < segment_of_.size(); ++t) {
      if (segment_of_[t] >= 0) rank[t] = tensors_in[segment_of_[t]]++;
    }
    std::vector<FilterCounts> counts(static_cast<size_t>(nthreads) * nseg);
    std::vector<char> full(static_cast<size_t>(nthreads) * nseg, 0);
    buffers_.assign(static_cast<size_t>(nthreads), {});
    pieces_.assign(static_cast<size_t>(nthreads), {});

    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
      const int tid = at::get_thread_num();
      std::vector<float>& out = buffers_[tid];
      std::vector<Piece>& pieces = pieces_[tid];
      size_t stored = out.size();
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t s = segment_of_[ch.tensor];
        const FilterSegment& seg = segments_[s];
        FilterCounts& cnt = counts[tid * nseg + s];
        char& seg_full = full[tid * nseg + s];
        const int64_t nan_before = cnt.nan;
        // In pieces, so that the room each call needs (its length) stays small next to the cap.
        constexpr int64_t kPiece = 4096;
        const auto run = [&](ScoreKind kind, const float* pa, const float* pb, int64_t n) {
          for (int64_t i = 0; i < n; i += kPiece) {
            const int64_t len = std::min(kPiece, n - i);
            float* dst = nullptr;
            if (!seg_full) {
              if (kept_total[s].load(std::memory_order_relaxed) + len > seg.cap) {
                seg_full = 1;
              } else {
                const size_t room = stored + static_cast<size_t>(len) + 8;
                if (out.size() < room) out.resize(2 * room);
                dst = out.data() + stored;
              }
            }
            const int64_t before = cnt.inside;
            filter_(kind, pa + i, pb + i, len, seg.lo, seg.hi, dst, cnt);
            const int64_t added = cnt.inside - before;
            if (dst != nullptr && added > 0) {
              if (!pieces.empty() && pieces.back().segment == s && pieces.back().end == stored) {
                pieces.back().end += static_cast<size_t>(added);
              } else {
                pieces.push_back({s, stored, stored + static_cast<size_t>(added)});
              }
              stored += static_cast<size_t>(added);
              kept_total[s].fetch_add(added, std::memory_order_relaxed);
            }
          }
        };
        filter_chunk(ch, run);
        if (cnt.nan > nan_before) {
          int64_t cur = first_nan[s].load();
          while (rank[ch.tensor] < cur && !first_nan[s].compare_exchange_weak(cur, rank[ch.tensor])) {
          }
        }
      }
      out.resize(stored);
    });

    std::vector<FilteredSegment> result(nseg);
    for (size_t s = 0; s < nseg; ++s) {
      FilteredSegment& r = result[s];
      for (int t = 0; t < nthreads; ++t) {
        const FilterCounts& c = counts[t * nseg + s];
        r.counts.above += c.above;
        r.counts.inside += c.inside;
        r.counts.nan += c.nan;
        r.complete = r.complete && !full[t * nseg + s];
      }
      const int64_t nan = first_nan[s].load();
      r.nan_tensor = nan == std::numeric_limits<int64_t>::max() ? -1 : nan;
    }
    for (int t = 0; t < nthreads; ++t) {
      for (const Piece& p : pieces_[t]) {
        TensorView view;
        view.data = buffers_[t].data() + p.begin;
        view.numel = view.sizes[0] = static_cast<int64_t>(p.end - p.begin);
        view.strides[0] = 1;
        result[p.segment].kept.push_back(view);
      }
    }
    return result;
  }

 private:
  struct Piece {
    int64_t segment;
    size_t begin;  // [begin, end) of a thread's buffer
    size_t end;
  };

  // run(kind, a, b, n) over the chunk's scores: straight from the tensors where they are contiguous
  // float32, else from blocks of computed scores (then as values: kind Value, b = a).
  template <class Run>
  void filter_chunk(const Chunk& ch, Run& run) const {
    const TensorView& a = in_.a[ch.tensor];
    const TensorView* b = in_.b.empty() ? nullptr : &in_.b[ch.tensor];
    const auto computed = [&](int64_t begin, int64_t end) {
      for_each_score_of<float>(in_.kind, a, b, begin, end,
                               [&](const float* s, int64_t m, int64_t) { run(ScoreKind::Value, s, s, m); });
    };
    if (a.dtype != DType::Float32 || (b != nullptr && b->dtype != DType::Float32)) return computed(ch.begin, ch.end);
    const float* pa = static_cast<const float*>(a.data);
    const float* pb = b ? static_cast<const float*>(b->data) : pa;
    for_each_pair_run(a, b, ch.begin, ch.end, [&](int64_t oa, int64_t sa, int64_t ob, int64_t sb, int64_t n, int64_t flat) {
      if (sa == 1 && sb == 1) {
        run(in_.kind, pa + oa, pb + ob, n);
      } else {
        computed(flat, flat + n);
      }
    });
  }

  const SelectInputs& in_;
  const std::vector<int64_t> segment_of_;
  const std::vector<FilterSegment> segments_;
  const FilterFn filter_;
  std::vector<std::vector<float>> buffers_;  // per thread
  std::vector<std::vector<Piece>> pieces_;   // per thread: which part of its buffer is whose
};

}  // namespace koopfast
