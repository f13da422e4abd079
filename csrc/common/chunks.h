// Fixed-size chunks over a list of tensors: the unit of parallel work on every backend.
//
// Chunk boundaries depend only on the tensor sizes and kChunkElems, never on the number of
// threads or blocks, so per-chunk partial results (histograms, tie counts) combine into the same
// answer on any machine.
#pragma once

#include <cstdint>
#include <vector>

#include "common/tensor_view.h"

namespace koopfast {

constexpr int64_t kChunkElems = int64_t{1} << 16;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // logical flat index range [begin, end) within that tensor
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk_elems = kChunkElems) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += (n + chunk_elems - 1) / chunk_elems;
  chunks.reserve(static_cast<size_t>(total));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += chunk_elems) {
      chunks.push_back({static_cast<int64_t>(t), b, b + chunk_elems < numels[t] ? b + chunk_elems : numels[t]});
    }
  }
  return chunks;
}

// The same chunks over tensor views (their logical sizes).
inline std::vector<Chunk> make_chunks(const std::vector<TensorView>& views, int64_t chunk_elems = kChunkElems) {
  std::vector<int64_t> numels;
  numels.reserve(views.size());
  for (const auto& v : views) numels.push_back(v.numel);
  return make_chunks(numels, chunk_elems);
}

}  // namespace koopfast
