// CPU backend of the select ops (at::parallel_for over fixed-size chunks, per-thread histograms).
//
// select_threshold is a most-significant-digit radix select on order-preserving keys. A fresh
// histogram pass touches a histogram bin per element and runs at ~1 element/ns/core, far from the
// memory bandwidth. So, for large inputs, a small deterministic sample first guesses the bucket
// (the leading key bits) holding the k-th largest; one speculative pass then counts the keys
// above that bucket with vectorized compares and histograms only the few keys inside it. If the
// guess holds (it fails only when the sample lies), the remaining key bits take at most one or
// two more such filtering passes; if not, the plain radix select runs from scratch. Either way
// the result is exact. Extra memory: per-thread histograms, the sample, one counter per chunk.
//
// topk_mask writes score > threshold (or >=, when every tie is kept) in one pass; if only some
// ties are kept, it counts ties per chunk, and a prefix over chunks hands each chunk its share of
// the kept ties, in flat-index order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/chunks.h"
#include "common/cpu_loops.h"
#include "select/filter_cpu.h"
#include "select/select_args.h"

namespace koopfast {
namespace {

constexpr int kDigitWidth = 16;                        // at most 2^16 bins per pass
constexpr int kSmallDigitWidth = 8;                    // for inputs too small to amortize 2^16 bins
constexpr int64_t kSmallInput = int64_t{1} << 18;
constexpr int64_t kSampleMinInput = int64_t{1} << 18;  // below this, no sampling
constexpr int64_t kSampleSize = 8192;

const TensorView* b_of(const SelectInputs& in, int64_t t) { return in.b.empty() ? nullptr : &in.b[t]; }

template <class C>
class CpuSelect {
 public:
  using K = typename KeyOf<C>::type;

  explicit CpuSelect(const SelectInputs& in) : in_(in), chunks_(make_chunks(in.a)) {}

  // Fills threshold (0-dim C) and stats (int64[kNumSelectStats]).
  void run(int64_t k, C* threshold, int64_t* stats) {
    RangeState<K> st;
    st.k_rem = k;
    st.n_bucket = in_.total;
    const int width = in_.total < kSmallInput ? kSmallDigitWidth : kDigitWidth;
    bool first = true;
    if (in_.total >= kSampleMinInput) {
      // Speculate on a sampled range; if it misses, keep the counts and go where the target is.
      RangeState<K> guess = sample_guess(k);
      first = false;
      bool counted = false;
      if constexpr (std::is_same_v<C, float>) {
        if (const FilterFn filter = fast_filter()) {
          if (select_among_candidates(filter, guess, k, threshold, stats)) return;
          st = guess;
          counted = true;
        }
      }
      if (!counted) {
        const RangeBins<K> g = range_bins(guess, width);
        int64_t above = 0, inside = 0;
        const int64_t nan = scan(guess, g, /*check_nan=*/true, above, inside);
        if (nan >= 0) return report_nan(nan, threshold, stats);
        st = guess;
        if (above < k && k <= above + inside) {
          st.k_rem = k - above;
          st.n_greater = above;
          st.n_bucket = inside;
          range_descend(st, hist_.data(), g);
        } else {
          range_retarget(st, k, above, inside);
          st.n_bucket = -1;  // unknown until the next pass
        }
      }
    }
    while (!st.done() || st.n_bucket < 0) {
      const RangeBins<K> g = range_bins(st, width);
      int64_t above = 0, inside = 0;
      const int64_t nan = scan(st, g, first, above, inside);
      if (nan >= 0) return report_nan(nan, threshold, stats);
      first = false;
      range_descend(st, hist_.data(), g);
    }
    *threshold = from_key<C>(st.lo);
    stats[kNumGreater] = st.n_greater;
    stats[kNumEqual] = st.n_bucket;
    stats[kNumTiesKept] = st.k_rem;
    stats[kNanTensor] = -1;
  }

 private:
  static void report_nan(int64_t tensor, C* threshold, int64_t* stats) {
    *threshold = std::numeric_limits<C>::quiet_NaN();
    stats[kNumGreater] = stats[kNumEqual] = stats[kNumTiesKept] = 0;
    stats[kNanTensor] = tensor;
  }

  // One pass: hist_ = histogram of the keys in [st.lo, st.hi] in bins g; `above` = number of
  // keys greater than st.hi; `inside` = number in the range. Returns the first tensor with a NaN
  // score if check_nan (else -1).
  int64_t scan(const RangeState<K>& st, const RangeBins<K>& g, bool check_nan, int64_t& total_above,
               int64_t& total_inside) {
    // Candidates are found with float compares against the range's bounds, which vectorize better
    // than key arithmetic; for non-NaN scores, lo_f <= s <= hi_f <=> lo <= key(s) <= hi.
    const K lo = st.lo;
    const C lo_f = lo <= to_key(-std::numeric_limits<C>::infinity()) ? -std::numeric_limits<C>::infinity() : from_key<C>(lo);
    const C hi_f = st.hi >= to_key(std::numeric_limits<C>::infinity()) ? std::numeric_limits<C>::infinity() : from_key<C>(st.hi);
    const int shift = g.shift;
    const int64_t nbins = g.count;
    const int nthreads = at::get_num_threads();
    // Per-thread 32-bit counters (half the cache footprint of 64-bit ones). A round holds at most
    // 2^31 elements, even if it runs on one thread (nested parallelism), so they cannot overflow
    // before being added up.
    const int64_t round_chunks = (int64_t{1} << 31) / kChunkElems;
    std::vector<uint32_t> hists(static_cast<size_t>(nthreads) * nbins);
    std::vector<int64_t> aboves(static_cast<size_t>(nthreads), 0);
    std::atomic<int64_t> first_nan{std::numeric_limits<int64_t>::max()};
    hist_.assign(static_cast<size_t>(nbins), 0);

    const int64_t num_chunks = static_cast<int64_t>(chunks_.size());
    for (int64_t round = 0; round < num_chunks; round += round_chunks) {
      std::fill(hists.begin(), hists.end(), 0u);
      at::parallel_for(round, std::min(num_chunks, round + round_chunks), 1, [&](int64_t cb, int64_t ce) {
        const int tid = at::get_thread_num();
        uint32_t* hist = hists.data() + static_cast<int64_t>(tid) * nbins;
        int64_t above = 0;
        for (int64_t c = cb; c < ce; ++c) {
          const Chunk& ch = chunks_[c];
          uint32_t nans = 0;
          for_each_score_of<C>(in_.kind, in_.a[ch.tensor], b_of(in_, ch.tensor), ch.begin, ch.end,
                               [&](const C* s, int64_t m, int64_t) {
                                 alignas(8) uint8_t inside[kScoreBlock];
                                 uint32_t n_above = 0, n_in = 0, n_nan = 0;
                                 for (int64_t j = 0; j < m; ++j) {  // vectorized
                                   const uint8_t in_range = (s[j] >= lo_f) & (s[j] <= hi_f);
                                   inside[j] = in_range;
                                   n_in += in_range;
                                   n_above += s[j] > hi_f;
                                   n_nan += s[j] != s[j];
                                 }
                                 above += n_above;
                                 nans += n_nan;
                                 if (n_in == 0) return;
                                 for (int64_t j = m; j < kScoreBlock && (j & 7) != 0; ++j) inside[j] = 0;
                                 // Candidates are sparse after the first pass: skip 8 flags at a time.
                                 for (int64_t w = 0; w < m; w += 8) {
                                   uint64_t word;
                                   memcpy(&word, inside + w, 8);
                                   while (word != 0) {
                                     const int64_t j = w + (__builtin_ctzll(word) >> 3);
                                     ++hist[static_cast<int64_t>(K(to_key(s[j]) - lo) >> shift)];
                                     word &= word - 1;
                                   }
                                 }
                               });
          if (check_nan && nans > 0) {
            int64_t cur = first_nan.load();
            while (ch.tensor < cur && !first_nan.compare_exchange_weak(cur, ch.tensor)) {
            }
          }
        }
        aboves[tid] += above;
      });
      for (int t = 0; t < nthreads; ++t) {
        const uint32_t* h = hists.data() + static_cast<int64_t>(t) * nbins;
        for (int64_t i = 0; i < nbins; ++i) hist_[i] += h[i];
      }
    }
    total_above = 0;
    total_inside = 0;
    for (int t = 0; t < nthreads; ++t) total_above += aboves[t];
    for (int64_t h : hist_) total_inside += h;
    const int64_t nan = first_nan.load();
    return nan == std::numeric_limits<int64_t>::max() ? -1 : nan;
  }

  // The fast first pass (float32 scores, a CPU with a vector filter): one filtering pass over the
  // sampled range `guess` that counts the scores above it and keeps those inside, then the target
  // is selected among the kept ones alone (a few percent of the input, in cache). Returns true with
  // threshold and stats filled, or false with st_ set up for the histogram passes: the counts of the
  // pass are kept (a NaN is reported then too, through stats, and true returned).
  bool select_among_candidates(FilterFn filter, RangeState<K>& guess, int64_t k, C* threshold, int64_t* stats) {
    const C lo_f = bound_of(guess.lo, false);
    const C hi_f = bound_of(guess.hi, true);
    const int nthreads = at::get_num_threads();
    // The kept scores may take at most an eighth of the input's elements (a sample that lies, or
    // many ties, fill more: then the histogram passes take over, with the counts of this pass).
    const int64_t cap = std::max<int64_t>(in_.total / 8, 1);
    std::atomic<int64_t> kept_total{0};
    std::vector<std::vector<float>> kept(static_cast<size_t>(nthreads));
    std::vector<FilterCounts> counts(static_cast<size_t>(nthreads));
    std::vector<char> full(static_cast<size_t>(nthreads), 0);
    std::atomic<int64_t> first_nan{std::numeric_limits<int64_t>::max()};
    at::parallel_for(0, static_cast<int64_t>(chunks_.size()), 1, [&](int64_t cb, int64_t ce) {
      const int tid = at::get_thread_num();
      std::vector<float>& out = kept[tid];
      FilterCounts& cnt = counts[tid];
      size_t stored = out.size();
      const auto run = [&](ScoreKind kind, const float* pa, const float* pb, int64_t n) {
        float* dst = nullptr;
        if (!full[tid]) {
          if (kept_total.load(std::memory_order_relaxed) + n > cap) {
            full[tid] = 1;
          } else {
            if (out.size() < stored + static_cast<size_t>(n) + 8) out.resize(2 * (stored + static_cast<size_t>(n) + 8));
            dst = out.data() + stored;
          }
        }
        const int64_t before = cnt.inside;
        filter(kind, pa, pb, n, lo_f, hi_f, dst, cnt);
        if (dst != nullptr) {
          stored += static_cast<size_t>(cnt.inside - before);
          kept_total.fetch_add(cnt.inside - before, std::memory_order_relaxed);
        }
      };
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks_[c];
        const int64_t nan_before = cnt.nan;
        filter_chunk(ch, run);
        if (cnt.nan > nan_before) {
          int64_t cur = first_nan.load();
          while (ch.tensor < cur && !first_nan.compare_exchange_weak(cur, ch.tensor)) {
          }
        }
      }
      out.resize(stored);
    });
    if (first_nan.load() != std::numeric_limits<int64_t>::max()) {
      report_nan(first_nan.load(), threshold, stats);
      return true;
    }
    int64_t above = 0, inside = 0;
    bool complete = true;
    for (int t = 0; t < nthreads; ++t) {
      above += counts[t].above;
      inside += counts[t].inside;
      complete = complete && !full[t];
    }
    if (!(above < k && k <= above + inside)) {
      range_retarget(guess, k, above, inside);
      guess.n_bucket = -1;  // unknown until the next pass
      return false;
    }
    guess.k_rem = k - above;
    guess.n_greater = above;
    guess.n_bucket = inside;
    if (!complete) return false;
    SelectInputs among;
    among.kind = ScoreKind::Value;
    among.total = inside;
    for (auto& v : kept) {
      if (v.empty()) continue;
      TensorView view;
      view.data = v.data();
      view.numel = view.sizes[0] = static_cast<int64_t>(v.size());
      view.strides[0] = 1;
      among.a.push_back(view);
    }
    CpuSelect<C>(among).run(k - above, threshold, stats);
    stats[kNumGreater] += above;
    return true;
  }

  // The float bound of a key range's end (keys beyond the infinities: the infinity itself).
  static C bound_of(K key, bool upper) {
    constexpr C inf = std::numeric_limits<C>::infinity();
    if (!upper) return key <= to_key(-inf) ? -inf : from_key<C>(key);
    return key >= to_key(inf) ? inf : from_key<C>(key);
  }

  // run(kind, a, b, n) over the chunk's scores: straight from the tensors where they are contiguous
  // float32, else from blocks of computed scores (then as values: kind Value, b = a).
  template <class Run>
  void filter_chunk(const Chunk& ch, Run& run) const {
    const TensorView& a = in_.a[ch.tensor];
    const TensorView* b = b_of(in_, ch.tensor);
    const auto computed = [&](int64_t begin, int64_t end) {
      for_each_score_of<C>(in_.kind, a, b, begin, end,
                           [&](const C* s, int64_t m, int64_t) { run(ScoreKind::Value, s, s, m); });
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

  // A key range likely to hold the k-th largest key: the order statistics of a deterministic
  // stratified sample 4 standard deviations on either side of the target rank.
  RangeState<K> sample_guess(int64_t k) const {
    const int64_t n = in_.total;
    const int64_t m = std::min(kSampleSize, n);
    const int64_t stratum = n / m;
    std::vector<int64_t> starts(in_.a.size() + 1, 0);  // first global index of each tensor
    for (size_t t = 0; t < in_.a.size(); ++t) starts[t + 1] = starts[t] + in_.a[t].numel;
    std::vector<int64_t> positions(static_cast<size_t>(m));
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    for (int64_t j = 0; j < m; ++j) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      positions[j] = j * stratum + static_cast<int64_t>((rng >> 33) % static_cast<uint64_t>(stratum));
    }
    std::vector<K> keys(static_cast<size_t>(m));
    at::parallel_for(0, m, 256, [&](int64_t jb, int64_t je) {  // random reads: latency-bound
      for (int64_t j = jb; j < je; ++j) {
        const int64_t t = std::upper_bound(starts.begin(), starts.end(), positions[j]) - starts.begin() - 1;
        const int64_t i = positions[j] - starts[t];
        for_each_score_of<C>(in_.kind, in_.a[t], b_of(in_, t), i, i + 1,
                             [&](const C* s, int64_t, int64_t) { keys[j] = to_key(s[0]); });
      }
    });
    std::sort(keys.begin(), keys.end(), [](K x, K y) { return x > y; });
    const double q = static_cast<double>(k) / static_cast<double>(n);
    const double p = q * static_cast<double>(m);
    const double delta = 4.0 * std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 4.0;
    const auto at_rank = [&](double x) {
      return keys[static_cast<size_t>(std::clamp<double>(x, 0.0, static_cast<double>(m - 1)))];
    };
    RangeState<K> guess;
    guess.hi = p - delta < 0.0 ? ~K(0) : at_rank(std::floor(p - delta));
    guess.lo = p + delta > static_cast<double>(m - 1) ? K(0) : at_rank(std::ceil(p + delta));
    return guess;
  }

  const SelectInputs& in_;
  const std::vector<Chunk> chunks_;
  std::vector<int64_t> hist_;
};

std::tuple<at::Tensor, at::Tensor> select_threshold_cpu(at::TensorList a, at::TensorList b, std::string_view score,
                                                        int64_t k) {
  constexpr const char* op = "select_threshold";
  auto in = prepare_select_inputs(op, a, b, score);
  check_select_k(op, in, k);
  auto threshold = at::empty({}, a[0].options().dtype(in.wide ? c10::kDouble : c10::kFloat));
  auto stats = at::empty({kNumSelectStats}, a[0].options().dtype(c10::kLong));
  if (in.wide) {
    CpuSelect<double>(in).run(k, threshold.data_ptr<double>(), stats.data_ptr<int64_t>());
  } else {
    CpuSelect<float>(in).run(k, threshold.data_ptr<float>(), stats.data_ptr<int64_t>());
  }
  return {threshold, stats};
}

// ---- per tensor: one selection per tensor, all in one call ---------------------------------------

// Tensors from this size on are selected one after the other, each by all threads; smaller ones
// are spread over the threads, one thread per tensor (nested parallel regions run inline).
constexpr int64_t kOwnThreadsMin = int64_t{1} << 20;

// select_threshold over in.a[t] alone (compute dtype: in's), for k in [0, numel]. k = 0 (and an
// empty tensor) gives threshold +inf with stats (0, number of scores equal to +inf, 0, NaN).
template <class C>
void select_one(const SelectInputs& in, size_t t, int64_t k, C* threshold, int64_t* stats) {
  SelectInputs one;
  one.a = {in.a[t]};
  if (!in.b.empty()) one.b = {in.b[t]};
  one.kind = in.kind;
  one.wide = in.wide;
  one.total = in.a[t].numel;
  constexpr C inf = std::numeric_limits<C>::infinity();
  if (one.total == 0) {
    *threshold = inf;
    stats[kNumGreater] = stats[kNumEqual] = stats[kNumTiesKept] = 0;
    stats[kNanTensor] = -1;
    return;
  }
  CpuSelect<C>(one).run(std::max<int64_t>(k, 1), threshold, stats);  // k = 0 still looks for NaN
  if (k == 0 && stats[kNanTensor] < 0) {
    // The largest score is +inf exactly when +inf is the threshold of k = 1: its ties are all of them.
    stats[kNumEqual] = *threshold == inf ? stats[kNumEqual] : 0;
    stats[kNumGreater] = stats[kNumTiesKept] = 0;
    *threshold = inf;
  }
}

template <class C>
void select_per_tensor(const SelectInputs& in, const std::vector<int64_t>& k, C* thresholds, int64_t* stats) {
  std::vector<size_t> small;
  for (size_t t = 0; t < in.a.size(); ++t) {
    if (in.a[t].numel >= kOwnThreadsMin) {
      select_one<C>(in, t, k[t], thresholds + t, stats + t * kNumSelectStats);
    } else {
      small.push_back(t);
    }
  }
  // Split the small tensors into one contiguous group per thread holding about equal elements.
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> before(small.size() + 1, 0);
  for (size_t i = 0; i < small.size(); ++i) before[i + 1] = before[i] + in.a[small[i]].numel + 1;
  at::parallel_for(0, nthreads, 1, [&](int64_t gb, int64_t ge) {
    const auto first = std::lower_bound(before.begin(), before.end() - 1, before.back() * gb / nthreads);
    const auto last = std::lower_bound(before.begin(), before.end() - 1, before.back() * ge / nthreads);
    for (auto it = first; it < last; ++it) {
      const size_t t = small[static_cast<size_t>(it - before.begin())];
      select_one<C>(in, t, k[t], thresholds + t, stats + t * kNumSelectStats);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_threshold_per_tensor_cpu(at::TensorList a, at::TensorList b,
                                                                   std::string_view score, at::IntArrayRef k) {
  constexpr const char* op = "select_threshold_per_tensor";
  auto in = prepare_select_inputs(op, a, b, score);
  const std::vector<int64_t> ks = check_per_tensor_k(op, in, k);
  const int64_t n = static_cast<int64_t>(a.size());
  auto thresholds = at::empty({n}, a[0].options().dtype(in.wide ? c10::kDouble : c10::kFloat));
  auto stats = at::empty({n, kNumSelectStats}, a[0].options().dtype(c10::kLong));
  if (in.wide) {
    select_per_tensor<double>(in, ks, thresholds.data_ptr<double>(), stats.data_ptr<int64_t>());
  } else {
    select_per_tensor<float>(in, ks, thresholds.data_ptr<float>(), stats.data_ptr<int64_t>());
  }
  return {thresholds, stats};
}

// ---- masks ------------------------------------------------------------------------------------------

// Where the mask pass takes its thresholds: tensor t belongs to segment segment_of[t] (segments
// are contiguous runs of tensors), which has its own threshold, tie count and tie quota.
template <class C>
struct MaskSegments {
  std::vector<int64_t> segment_of;
  std::vector<C> threshold;
  std::vector<int64_t> n_equal;
  std::vector<int64_t> ties_kept;
};

template <class C>
void mask_cpu(const SelectInputs& in, const MaskSegments<C>& seg, std::vector<at::Tensor>& masks) {
  const auto chunks = make_chunks(in.a);
  const auto keep_all_ties = [&](int64_t s) { return seg.ties_kept[s] == seg.n_equal[s]; };
  bool any_partial = false;
  for (size_t s = 0; s < seg.threshold.size(); ++s) any_partial = any_partial || !keep_all_ties(s);
  std::vector<int64_t> chunk_ties(any_partial ? chunks.size() : 0, 0);
  std::vector<bool*> out(masks.size());
  for (size_t i = 0; i < masks.size(); ++i) out[i] = masks[i].data_ptr<bool>();

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t s = seg.segment_of[ch.tensor];
      const C thr = seg.threshold[s];
      const bool all_ties = keep_all_ties(s);
      bool* dst = out[ch.tensor];
      int64_t ties = 0;
      for_each_score_of<C>(in.kind, in.a[ch.tensor], b_of(in, ch.tensor), ch.begin, ch.end,
                           [&](const C* sc, int64_t m, int64_t flat) {
                             bool* d = dst + flat;
                             if (all_ties) {
                               for (int64_t j = 0; j < m; ++j) d[j] = sc[j] >= thr;
                             } else {
                               uint32_t t = 0;
                               for (int64_t j = 0; j < m; ++j) {
                                 d[j] = sc[j] > thr;
                                 t += sc[j] == thr;
                               }
                               ties += t;
                             }
                           });
      if (!all_ties) chunk_ties[c] = ties;
    }
  });
  if (!any_partial) return;

  // Chunk c holds the ties ranked [before[c], before[c] + chunk_ties[c]) of its segment in
  // (tensor, flat index) order; those ranked below the segment's ties_kept are kept.
  std::vector<int64_t> before(chunks.size(), 0);
  for (size_t c = 1; c < chunks.size(); ++c) {
    const bool same = seg.segment_of[chunks[c].tensor] == seg.segment_of[chunks[c - 1].tensor];
    before[c] = same ? before[c - 1] + chunk_ties[c - 1] : 0;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t s = seg.segment_of[ch.tensor];
      if (chunk_ties[c] == 0 || before[c] >= seg.ties_kept[s]) continue;
      int64_t quota = seg.ties_kept[s] - before[c];
      const C thr = seg.threshold[s];
      bool* dst = out[ch.tensor];
      for_each_score_of<C>(in.kind, in.a[ch.tensor], b_of(in, ch.tensor), ch.begin, ch.end,
                           [&](const C* sc, int64_t m, int64_t flat) {
                             for (int64_t j = 0; j < m && quota > 0; ++j) {
                               if (sc[j] == thr) {
                                 dst[flat + j] = true;
                                 --quota;
                               }
                             }
                           });
    }
  });
}

std::vector<at::Tensor> empty_masks_like(at::TensorList a) {
  std::vector<at::Tensor> masks;
  masks.reserve(a.size());
  for (const auto& t : a) masks.push_back(at::empty(t.sizes(), t.options().dtype(c10::kBool)));
  return masks;
}

std::vector<at::Tensor> topk_mask_cpu(at::TensorList a, at::TensorList b, std::string_view score,
                                      const at::Tensor& threshold, const at::Tensor& stats) {
  constexpr const char* op = "topk_mask";
  auto in = prepare_select_inputs(op, a, b, score);
  const ThresholdStats st = check_threshold_args(op, in, a[0], threshold, stats);  // any strides
  auto masks = empty_masks_like(a);
  const auto run = [&](auto ctag) {
    using C = typename decltype(ctag)::type;
    MaskSegments<C> seg{std::vector<int64_t>(a.size(), 0), {*threshold.data_ptr<C>()}, {st.n_equal},
                        {st.ties_kept}};
    mask_cpu<C>(in, seg, masks);
  };
  in.wide ? run(TypeTag<double>{}) : run(TypeTag<float>{});
  return masks;
}

std::vector<at::Tensor> topk_mask_per_tensor_cpu(at::TensorList a, at::TensorList b, std::string_view score,
                                                 const at::Tensor& thresholds, const at::Tensor& stats) {
  constexpr const char* op = "topk_mask_per_tensor";
  auto in = prepare_select_inputs(op, a, b, score);
  check_per_tensor_threshold_args(op, in, a[0], thresholds, stats);
  const int64_t n = static_cast<int64_t>(a.size());
  const auto st = stats.contiguous();
  const int64_t* rows = st.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) check_mask_stats(op, rows + t * kNumSelectStats, t);
  auto masks = empty_masks_like(a);
  const auto run = [&](auto ctag) {
    using C = typename decltype(ctag)::type;
    const auto thr = thresholds.contiguous();
    MaskSegments<C> seg;
    for (int64_t t = 0; t < n; ++t) {
      seg.segment_of.push_back(t);
      seg.threshold.push_back(thr.data_ptr<C>()[t]);
      seg.n_equal.push_back(rows[t * kNumSelectStats + kNumEqual]);
      seg.ties_kept.push_back(rows[t * kNumSelectStats + kNumTiesKept]);
    }
    mask_cpu<C>(in, seg, masks);
  };
  in.wide ? run(TypeTag<double>{}) : run(TypeTag<float>{});
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CPU, m) {
  m.impl("select_threshold", &select_threshold_cpu);
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("select_threshold_per_tensor", &select_threshold_per_tensor_cpu);
  m.impl("topk_mask_per_tensor", &topk_mask_per_tensor_cpu);
}

}  // namespace koopfast
