// CPU backend of the select ops (at::parallel_for over fixed-size chunks, per-thread histograms).
//
// select_threshold is a most-significant-digit radix select on order-preserving keys. A fresh
// histogram pass touches a histogram bin per element and runs at ~1 element/ns/core, far from the
// memory bandwidth. So, for inputs from 2^14 elements on, a small deterministic sample (runs of 16
// consecutive scores in equal strata) first guesses a key range holding the k-th largest. For
// float32 scores on a CPU with AVX2, one filtering pass (filter_pass.h, filter_cpu.cpp) then counts
// the scores above that range and keeps those inside it (a few percent of the input), and the
// target is selected among the kept scores alone, starting from the guessed range: one read of the
// input, at the speed of a streaming sum. Elsewhere (float64, no AVX2) the speculative pass counts
// the keys above the range and histograms only those inside it, and one or two more such passes
// follow. If the guess misses (the sample lied) or the range holds too many scores to keep (ties),
// the histogram passes go on from the counts of that pass. Either way the result is exact. Extra
// memory: per-thread histograms, the sample, the kept scores (at most a quarter of the input's
// elements, a few percent in practice), one counter per chunk.
//
// select_threshold_per_tensor filters every sampled tensor in the same single pass, each against
// its own range, and then selects each tensor among its own kept scores, a thread per tensor.
//
// topk_mask writes score > threshold (or >=, when every tie is kept) in one pass (32 scores per
// AVX2 step for contiguous float32); if only some ties are kept, it counts ties per chunk, and a
// prefix over chunks hands each chunk its share of the kept ties, in flat-index order.
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
#include "select/filter_pass.h"
#include "select/select_args.h"

namespace koopfast {
namespace {

constexpr int kDigitWidth = 16;                        // at most 2^16 bins per pass
constexpr int kSmallDigitWidth = 11;                   // for inputs too small to amortize 2^16 bins
constexpr int64_t kSmallInput = int64_t{1} << 18;
constexpr int kTinyDigitWidth = 8;                     // and for those too small to amortize 2^11
constexpr int64_t kTinyInput = int64_t{1} << 12;
// Inputs from kSampleMinInput elements on are sampled: kSampleSize elements, or one in
// kSampleStride of them if that is fewer (small tensors, selected one per thread in
// select_threshold_per_tensor, would otherwise spend more time on their sample than on the data).
constexpr int64_t kSampleMinInput = int64_t{1} << 14;
constexpr int64_t kSampleSize = 8192;
constexpr int64_t kSampleStride = 32;
constexpr int64_t kSampleRun = 16;  // consecutive scores per sampled place (a cache line of float32)
// A sample whose range is expected to hold more than this fraction of the input is not worth
// taking: the histogram passes go straight at it (small inputs, and the kept scores of a filter).
constexpr double kMaxSampledFraction = 1.0 / 8;

const TensorView* b_of(const SelectInputs& in, int64_t t) { return in.b.empty() ? nullptr : &in.b[t]; }

template <class C>
class CpuSelect {
 public:
  using K = typename KeyOf<C>::type;

  explicit CpuSelect(const SelectInputs& in) : in_(in), chunks_(make_chunks(in.a)) {}

  // Fills threshold (0-dim C) and stats (int64[kNumSelectStats]).
  // Every score is known to lie in the key range [lo, hi] (the caller's knowledge: the whole key
  // range by default, the sampled range for the scores kept by a filtering pass).
  void run(int64_t k, C* threshold, int64_t* stats, K lo = K(0), K hi = ~K(0)) {
    RangeState<K> st;
    st.lo = lo;
    st.hi = hi;
    st.k_rem = k;
    st.n_bucket = in_.total;
    const int width = in_.total < kTinyInput ? kTinyDigitWidth : in_.total < kSmallInput ? kSmallDigitWidth : kDigitWidth;
    bool first = true;
    if (worth_sampling(k)) {
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
  // threshold and stats filled (a NaN reported too), or false with guess set up for the histogram
  // passes, which keep the counts of this pass.
  bool select_among_candidates(FilterFn filter, RangeState<K>& guess, int64_t k, C* threshold, int64_t* stats) {
    FilterPass pass(in_, std::vector<int64_t>(in_.a.size(), 0), {filter_segment(guess)}, filter);
    const FilteredSegment r = std::move(pass.run()[0]);
    return finish_filtered(r, guess, k, threshold, stats);
  }

 public:
  // The filtering pass's view of a guessed range: its float bounds, and at most a quarter of the
  // input kept, twice what a sample is allowed to expect (a sample that lies, or many ties, fill
  // more: then the histogram passes take over).
  FilterSegment filter_segment(const RangeState<K>& guess) const {
    return {bound_of(guess.lo, false), bound_of(guess.hi, true), std::max<int64_t>(in_.total / 4, 1)};
  }

  // After the filtering pass r over the guessed range: as select_among_candidates.
  static bool finish_filtered(const FilteredSegment& r, RangeState<K>& guess, int64_t k, C* threshold, int64_t* stats) {
    if (r.nan_tensor >= 0) {
      report_nan(r.nan_tensor, threshold, stats);
      return true;
    }
    const int64_t above = r.counts.above, inside = r.counts.inside;
    if (!(above < k && k <= above + inside)) {
      range_retarget(guess, k, above, inside);
      guess.n_bucket = -1;  // unknown until the next pass
      return false;
    }
    guess.k_rem = k - above;
    guess.n_greater = above;
    guess.n_bucket = inside;
    if (!r.complete) return false;
    SelectInputs among;
    among.kind = ScoreKind::Value;
    among.total = inside;
    among.a = r.kept;
    CpuSelect<C>(among).run(k - above, threshold, stats, guess.lo, guess.hi);
    stats[kNumGreater] += above;
    return true;
  }

  // The float bound of a key range's end (keys beyond the infinities: the infinity itself).
  static C bound_of(K key, bool upper) {
    constexpr C inf = std::numeric_limits<C>::infinity();
    if (!upper) return key <= to_key(-inf) ? -inf : from_key<C>(key);
    return key >= to_key(inf) ? inf : from_key<C>(key);
  }

  // Whether a sample is worth taking for the k-th largest of these inputs.
  bool worth_sampling(int64_t k) const { return worth_sampling(in_.total, k); }

  // The same for the k-th largest of n scores, before any input is prepared.
  static bool worth_sampling(int64_t n, int64_t k) {
    return n >= kSampleMinInput && sample_fraction(n, k) <= kMaxSampledFraction;
  }

  static int64_t sample_size(int64_t n) { return std::min(kSampleSize, n / kSampleStride) / kSampleRun * kSampleRun; }

  // Half the width, in sample ranks, of the sampled range around the target rank.
  static double sample_delta(int64_t n, int64_t k) {
    const double q = static_cast<double>(k) / static_cast<double>(n);
    return 4.0 * std::sqrt(static_cast<double>(sample_size(n)) * q * (1.0 - q)) + 4.0;
  }

  // The fraction of the input expected inside the sampled range.
  static double sample_fraction(int64_t n, int64_t k) {
    return (2.0 * sample_delta(n, k) + 1.0) / static_cast<double>(sample_size(n));
  }

  RangeState<K> sample_guess(int64_t k) const {
    const int64_t n = in_.total;
    const int64_t m = sample_size(n);
    // Runs of kSampleRun consecutive scores, one at a random place in each of m / kSampleRun equal
    // strata: a cache line serves a whole run (these reads are latency-bound).
    const int64_t runs = m / kSampleRun;
    const int64_t stratum = n / runs;
    std::vector<int64_t> starts(in_.a.size() + 1, 0);  // first global index of each tensor
    for (size_t t = 0; t < in_.a.size(); ++t) starts[t + 1] = starts[t] + in_.a[t].numel;
    std::vector<int64_t> positions(static_cast<size_t>(runs));
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    for (int64_t j = 0; j < runs; ++j) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      positions[j] = j * stratum + static_cast<int64_t>((rng >> 33) % static_cast<uint64_t>(stratum - kSampleRun + 1));
    }
    std::vector<K> keys(static_cast<size_t>(m));
    at::parallel_for(0, runs, 32, [&](int64_t jb, int64_t je) {
      for (int64_t j = jb; j < je; ++j) {
        int64_t pos = positions[j];
        K* out = keys.data() + j * kSampleRun;
        while (pos < positions[j] + kSampleRun) {  // a run may cross into the next tensor
          const int64_t t = std::upper_bound(starts.begin(), starts.end(), pos) - starts.begin() - 1;
          const int64_t i = pos - starts[t];
          const int64_t len = std::min(positions[j] + kSampleRun - pos, in_.a[t].numel - i);
          for_each_score_of<C>(in_.kind, in_.a[t], b_of(in_, t), i, i + len, [&](const C* sc, int64_t cnt, int64_t) {
            for (int64_t q = 0; q < cnt; ++q) *out++ = to_key(sc[q]);
          });
          pos += len;
        }
      }
    });
    const double p = static_cast<double>(k) / static_cast<double>(n) * static_cast<double>(m);
    const double delta = sample_delta(n, k);
    // Two order statistics (descending) by partial selection: a full sort of the sample costs
    // more than filtering a small tensor.
    const auto at_rank = [&](double x, size_t from) {
      const size_t r = static_cast<size_t>(std::clamp<double>(x, static_cast<double>(from), static_cast<double>(m - 1)));
      std::nth_element(keys.begin() + static_cast<std::ptrdiff_t>(from), keys.begin() + static_cast<std::ptrdiff_t>(r),
                       keys.end(), [](K a, K b) { return a > b; });
      return std::pair<K, size_t>{keys[r], r};
    };
    RangeState<K> guess;
    size_t hi_rank = 0;
    if (p - delta >= 0.0) {
      const auto [key, rank] = at_rank(std::floor(p - delta), 0);
      guess.hi = key;
      hi_rank = rank;  // keys[hi_rank + 1, m) are all <= keys[hi_rank]: the next rank is among them
    }
    if (p + delta <= static_cast<double>(m - 1)) {
      guess.lo = p - delta >= 0.0 ? at_rank(std::ceil(p + delta), hi_rank + 1).first : at_rank(std::ceil(p + delta), 0).first;
    }
    return guess;
  }

 private:
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

// f(i) for i in [0, n), split into one contiguous group per thread of about equal weight(i) in all
// (a thread each for many small tasks of uneven cost).
template <class W, class F>
void parallel_weighted(int64_t n, W&& weight, F&& f) {
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> before(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) before[i + 1] = before[i] + weight(i);
  at::parallel_for(0, nthreads, 1, [&](int64_t gb, int64_t ge) {
    const auto first = std::lower_bound(before.begin(), before.end() - 1, before.back() * gb / nthreads);
    const auto last = std::lower_bound(before.begin(), before.end() - 1, before.back() * ge / nthreads);
    for (auto it = first; it < last; ++it) f(static_cast<int64_t>(it - before.begin()));
  });
}

// The inputs of select_threshold over in.a[t] alone.
SelectInputs one_tensor(const SelectInputs& in, size_t t) {
  SelectInputs one;
  one.a = {in.a[t]};
  if (!in.b.empty()) one.b = {in.b[t]};
  one.kind = in.kind;
  one.wide = in.wide;
  one.total = in.a[t].numel;
  return one;
}

// select_threshold over in.a[t] alone (compute dtype: in's), for k in [0, numel]. k = 0 (and an
// empty tensor) gives threshold +inf with stats (0, number of scores equal to +inf, 0, NaN).
template <class C>
void select_one(const SelectInputs& in, size_t t, int64_t k, C* threshold, int64_t* stats) {
  const SelectInputs one = one_tensor(in, t);
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

// The tensors worth sampling (float32 scores, a CPU with a vector filter) are selected together:
// a sample per tensor, one filtering pass over all of them (each tensor with its own range), then
// per tensor a selection among its kept scores. Returns whether tensor t is done; the others
// (small tensors, samples that missed) are left to select_one.
std::vector<char> select_per_tensor_filtered(const SelectInputs& in, const std::vector<int64_t>& k, float* thresholds,
                                             int64_t* stats, FilterFn filter) {
  using K = KeyOf<float>::type;
  const size_t n = in.a.size();
  std::vector<char> done(n, 0);
  std::vector<size_t> sampled;
  for (size_t t = 0; t < n; ++t) {
    if (k[t] >= 1 && CpuSelect<float>::worth_sampling(in.a[t].numel, k[t])) sampled.push_back(t);
  }
  if (sampled.empty()) return done;
  std::vector<RangeState<K>> guesses(sampled.size());
  std::vector<FilterSegment> segments(sampled.size());
  std::vector<int64_t> segment_of(n, -1);
  const int64_t count = static_cast<int64_t>(sampled.size());
  parallel_weighted(count, [&](int64_t i) { return CpuSelect<float>::sample_size(in.a[sampled[i]].numel); }, [&](int64_t i) {
    const SelectInputs single = one_tensor(in, sampled[i]);
    const CpuSelect<float> one(single);
    guesses[i] = one.sample_guess(k[sampled[i]]);
    segments[i] = one.filter_segment(guesses[i]);
  });
  for (size_t i = 0; i < sampled.size(); ++i) segment_of[sampled[i]] = static_cast<int64_t>(i);
  FilterPass pass(in, std::move(segment_of), std::move(segments), filter);
  const std::vector<FilteredSegment> filtered = pass.run();
  parallel_weighted(count, [&](int64_t i) { return filtered[i].counts.inside + 1; }, [&](int64_t i) {
    const size_t t = sampled[i];
    done[t] = CpuSelect<float>::finish_filtered(filtered[i], guesses[i], k[t], thresholds + t,
                                                stats + t * kNumSelectStats);
  });
  return done;
}

template <class C>
void select_per_tensor(const SelectInputs& in, const std::vector<int64_t>& k, C* thresholds, int64_t* stats) {
  std::vector<char> done(in.a.size(), 0);
  if constexpr (std::is_same_v<C, float>) {
    if (const FilterFn filter = fast_filter()) done = select_per_tensor_filtered(in, k, thresholds, stats, filter);
  }
  std::vector<size_t> small;
  for (size_t t = 0; t < in.a.size(); ++t) {
    if (done[t]) continue;
    if (in.a[t].numel >= kOwnThreadsMin) {
      select_one<C>(in, t, k[t], thresholds + t, stats + t * kNumSelectStats);
    } else {
      small.push_back(t);
    }
  }
  parallel_weighted(
      static_cast<int64_t>(small.size()), [&](int64_t i) { return in.a[small[i]].numel + 1; },
      [&](int64_t i) { select_one<C>(in, small[i], k[small[i]], thresholds + small[i], stats + small[i] * kNumSelectStats); });
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
  const MaskFn fast = std::is_same_v<C, float> ? fast_mask() : nullptr;

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t s = seg.segment_of[ch.tensor];
      const C thr = seg.threshold[s];
      const bool all_ties = keep_all_ties(s);
      bool* dst = out[ch.tensor];
      int64_t ties = 0;
      const auto computed = [&](int64_t begin, int64_t end) {
        for_each_score_of<C>(in.kind, in.a[ch.tensor], b_of(in, ch.tensor), begin, end,
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
      };
      const TensorView& a = in.a[ch.tensor];
      const TensorView* b = b_of(in, ch.tensor);
      if (fast != nullptr && a.dtype == DType::Float32 && (b == nullptr || b->dtype == DType::Float32)) {
        // Contiguous float32 runs straight through the vector loop (C is float: scores are not wide).
        const float* pa = static_cast<const float*>(a.data);
        const float* pb = b ? static_cast<const float*>(b->data) : pa;
        for_each_pair_run(a, b, ch.begin, ch.end,
                          [&](int64_t oa, int64_t sa, int64_t ob, int64_t sb, int64_t n, int64_t flat) {
                            if (sa == 1 && sb == 1) {
                              ties += fast(in.kind, pa + oa, pb + ob, n, static_cast<float>(thr), all_ties, dst + flat);
                            } else {
                              computed(flat, flat + n);
                            }
                          });
      } else {
        computed(ch.begin, ch.end);
      }
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
