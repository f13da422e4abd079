// CPU backend of the select ops (at::parallel_for over fixed-size chunks, per-thread histograms).
//
// select_threshold is a most-significant-digit radix select on order-preserving keys. A fresh
// histogram pass touches a histogram bin per element and runs at ~1 element/ns/core, far from the
// memory bandwidth. So, for large inputs, a small deterministic sample first guesses a key range
// likely to hold the k-th largest (about 1-3 % of the scores); one filtering pass then counts the
// scores above that range with vectorized compares (cpu_range.h), histograms the few inside it
// and keeps their keys. If the guess holds (it fails only when the sample lies), the histogram
// names the bin holding the target and an exact selection among the kept keys of that bin ends
// the search: one read of the input in all. If the guess misses (or too many keys fall inside),
// the plain radix select continues with more passes. Either way the result is exact, and
// independent of the thread count: the kept keys are a multiset, whatever order threads add them.
// Extra memory: per-thread histograms, the sample, the kept keys (at most total / 16).
//
// topk_mask writes score > threshold (or >=, when every tie is kept) in one pass; if only some
// ties are kept, it counts ties per chunk, and a prefix over chunks hands each chunk its share of
// the kept ties, in flat-index order. The per-tensor ops run the same code with one segment (own
// threshold, own tie quota) per tensor, all tensors in one call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/chunks.h"
#include "common/cpu_loops.h"
#include "common/cpu_range.h"
#include "select/select_args.h"

namespace koopfast {
namespace {

constexpr int kDigitWidth = 16;                        // at most 2^16 bins per pass
constexpr int kSmallDigitWidth = 8;                    // for inputs too small to amortize 2^16 bins
constexpr int64_t kSmallInput = int64_t{1} << 18;
constexpr int64_t kSampleMinInput = int64_t{1} << 18;  // below this, no sampling
// The sample: runs of kSampleRun consecutive scores (one cache line of float32: the reads are
// latency-bound), sqrt(total) runs clamped to [1024, 16384]: at 10^8 scores, 80,000 scores. Each
// candidate the filtering pass keeps costs far more than a scanned score, so a larger sample
// (a narrower guessed range) pays for its scattered reads.
constexpr int64_t kSampleRun = 8;
constexpr int64_t kSampleMinRuns = 1024;
constexpr int64_t kSampleMaxRuns = 16384;
constexpr int64_t kMaxKeptFraction = 16;  // kept candidate keys: at most total / 16

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
      const RangeBins<K> g = range_bins(guess, width);
      int64_t above = 0, inside = 0;
      const int64_t nan = scan(guess, g, /*check_nan=*/true, above, inside, /*keep=*/true);
      if (nan >= 0) return report_nan(nan, threshold, stats);
      first = false;
      if (above < k && k <= above + inside) {
        st = guess;
        st.k_rem = k - above;
        st.n_greater = above;
        st.n_bucket = inside;
        range_descend(st, hist_.data(), g);
        if (!st.done() && kept_valid_) select_among_kept(st);
      } else {
        st = guess;
        range_retarget(st, k, above, inside);
        st.n_bucket = -1;  // unknown until the next pass
      }
    }
    while (!st.done() || st.n_bucket < 0) {
      const RangeBins<K> g = range_bins(st, width);
      int64_t above = 0, inside = 0;
      const int64_t nan = scan(st, g, first, above, inside, /*keep=*/false);
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

  // Ends the search of st (the target's bin, not yet a single key) from the keys kept by the
  // filtering pass: the k_rem-th largest of those in [st.lo, st.hi] (st.n_bucket of them).
  void select_among_kept(RangeState<K>& st) {
    std::vector<K> bin;
    bin.reserve(static_cast<size_t>(st.n_bucket));
    for (const auto& keys : kept_) {
      for (K key : keys) {
        if (key >= st.lo && key <= st.hi) bin.push_back(key);
      }
    }
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(bin.size()) == st.n_bucket && st.k_rem >= 1 && st.k_rem <= st.n_bucket);
    const auto nth = bin.begin() + (st.k_rem - 1);
    std::nth_element(bin.begin(), nth, bin.end(), std::greater<K>());
    const K target = *nth;
    int64_t greater = 0, equal = 0;
    for (K key : bin) {
      greater += key > target;
      equal += key == target;
    }
    st.n_greater += greater;
    st.k_rem -= greater;
    st.n_bucket = equal;
    st.lo = st.hi = target;
  }

  // One pass: hist_ = histogram of the keys in [st.lo, st.hi] in bins g; `above` = number of
  // keys greater than st.hi; `inside` = number in the range. Returns the first tensor with a NaN
  // score if check_nan (else -1). With keep, the keys inside are also kept (kept_, per thread;
  // kept_valid_ says whether all of them fit in the budget).
  int64_t scan(const RangeState<K>& st, const RangeBins<K>& g, bool check_nan, int64_t& total_above,
               int64_t& total_inside, bool keep) {
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
    kept_.assign(keep ? static_cast<size_t>(nthreads) : 0, {});
    const int64_t keep_budget = std::max<int64_t>(in_.total / kMaxKeptFraction, 1);
    std::atomic<int64_t> kept_count{0};
    std::atomic<bool> keeping{keep};

    const int64_t num_chunks = static_cast<int64_t>(chunks_.size());
    for (int64_t round = 0; round < num_chunks; round += round_chunks) {
      std::fill(hists.begin(), hists.end(), 0u);
      at::parallel_for(round, std::min(num_chunks, round + round_chunks), 1, [&](int64_t cb, int64_t ce) {
        const int tid = at::get_thread_num();
        uint32_t* hist = hists.data() + static_cast<int64_t>(tid) * nbins;
        std::vector<K>* kept = keep ? &kept_[tid] : nullptr;
        int64_t above = 0;
        for (int64_t c = cb; c < ce; ++c) {
          const Chunk& ch = chunks_[c];
          const bool keep_chunk = keep && keeping.load(std::memory_order_relaxed);
          uint32_t nans = 0, inside = 0;
          for_each_score_of<C>(in_.kind, in_.a[ch.tensor], b_of(in_, ch.tensor), ch.begin, ch.end,
                               [&](const C* s, int64_t m, int64_t) {
                                 RangeFlags f;
                                 flag_range(s, m, lo_f, hi_f, f);
                                 above += f.above;
                                 nans += f.nan;
                                 if (f.inside == 0) return;
                                 inside += f.inside;
                                 // Candidates are sparse: visit the set bits only.
                                 for (int w = 0; w < RangeFlags::kWords; ++w) {
                                   for (uint64_t word = f.bits[w]; word != 0; word &= word - 1) {
                                     const K key = to_key(s[64 * w + __builtin_ctzll(word)]);
                                     ++hist[static_cast<int64_t>(K(key - lo) >> shift)];
                                     if (keep_chunk) kept->push_back(key);
                                   }
                                 }
                               });
          if (keep_chunk && kept_count.fetch_add(inside) + inside > keep_budget) keeping.store(false);
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
    kept_valid_ = keep && keeping.load();
    if (keep && !kept_valid_) kept_.clear();
    total_above = 0;
    total_inside = 0;
    for (int t = 0; t < nthreads; ++t) total_above += aboves[t];
    for (int64_t h : hist_) total_inside += h;
    const int64_t nan = first_nan.load();
    return nan == std::numeric_limits<int64_t>::max() ? -1 : nan;
  }

  // A key range likely to hold the k-th largest key: the order statistics of a deterministic
  // stratified sample (runs of kSampleRun consecutive scores, one per stratum), 5 standard
  // deviations on either side of the target rank (runs of neighbours are not independent draws:
  // the margin is wider than the 4 that independent draws would need).
  RangeState<K> sample_guess(int64_t k) const {
    const int64_t n = in_.total;
    const int64_t runs = std::clamp<int64_t>(static_cast<int64_t>(std::sqrt(static_cast<double>(n))),
                                             kSampleMinRuns, kSampleMaxRuns);
    const int64_t stratum = n / runs;  // >= kSampleMinInput / kSampleMaxRuns >= kSampleRun
    const int64_t m = runs * kSampleRun;
    std::vector<int64_t> starts(in_.a.size() + 1, 0);  // first global index of each tensor
    for (size_t t = 0; t < in_.a.size(); ++t) starts[t + 1] = starts[t] + in_.a[t].numel;
    std::vector<int64_t> positions(static_cast<size_t>(runs));
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    for (int64_t j = 0; j < runs; ++j) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      positions[j] = j * stratum + static_cast<int64_t>((rng >> 33) % static_cast<uint64_t>(stratum - kSampleRun + 1));
    }
    std::vector<K> keys(static_cast<size_t>(m));
    at::parallel_for(0, runs, 64, [&](int64_t jb, int64_t je) {  // scattered reads: latency-bound
      for (int64_t j = jb; j < je; ++j) {
        int64_t p = positions[j];
        K* out = keys.data() + j * kSampleRun;
        for (int64_t left = kSampleRun; left > 0;) {  // a run may cross into the next tensors
          const int64_t t = std::upper_bound(starts.begin(), starts.end(), p) - starts.begin() - 1;
          const int64_t i = p - starts[t];
          const int64_t len = std::min(left, in_.a[t].numel - i);
          for_each_score_of<C>(in_.kind, in_.a[t], b_of(in_, t), i, i + len, [&](const C* s, int64_t cnt, int64_t) {
            for (int64_t q = 0; q < cnt; ++q) *out++ = to_key(s[q]);
          });
          left -= len;
          p += len;
        }
      }
    });
    const double q = static_cast<double>(k) / static_cast<double>(n);
    const double p = q * static_cast<double>(m);
    const double delta = 5.0 * std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 8.0;
    const auto rank = [&](double x) {
      return static_cast<int64_t>(std::clamp<double>(x, 0.0, static_cast<double>(m - 1)));
    };
    // Two selections (descending) instead of a sort: the upper rank first, then the lower rank
    // among the keys after it.
    const int64_t r_hi = rank(std::floor(p - delta));
    const int64_t r_lo = std::max(rank(std::ceil(p + delta)), r_hi);
    std::nth_element(keys.begin(), keys.begin() + r_hi, keys.end(), std::greater<K>());
    std::nth_element(keys.begin() + r_hi, keys.begin() + r_lo, keys.end(), std::greater<K>());
    RangeState<K> guess;
    guess.hi = p - delta < 0.0 ? ~K(0) : keys[r_hi];
    guess.lo = p + delta > static_cast<double>(m - 1) ? K(0) : keys[r_lo];
    return guess;
  }

  const SelectInputs& in_;
  const std::vector<Chunk> chunks_;
  std::vector<int64_t> hist_;
  std::vector<std::vector<K>> kept_;  // per thread: keys inside the guessed range
  bool kept_valid_ = false;
};

std::tuple<at::Tensor, at::Tensor> select_threshold_cpu(at::TensorList a, at::TensorList b, std::string_view score,
                                                        int64_t k) {
  constexpr const char* op = "select_threshold";
  auto in = prepare_select_inputs(op, a, b, score);
  KF_CHECK_VALUE(in.total > 0, op, "expected at least one element in a, got only empty tensors");
  KF_CHECK_VALUE(k >= 1 && k <= in.total, op, "expected k in [1, ", in.total, "] (the number of elements), got ", k);
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
  check_threshold_args(op, in, a[0], threshold, stats);
  const int64_t* st = stats.data_ptr<int64_t>();
  check_mask_stats(op, st, -1);
  auto masks = empty_masks_like(a);
  const auto run = [&](auto ctag) {
    using C = typename decltype(ctag)::type;
    MaskSegments<C> seg{std::vector<int64_t>(a.size(), 0), {*threshold.data_ptr<C>()}, {st[kNumEqual]},
                        {st[kNumTiesKept]}};
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
