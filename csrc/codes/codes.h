// Region codes: bit-packed signs of pre-activations, and popcount Hamming distances between them.
//
// Torch-free pieces shared by the CPU and CUDA backends.
//
// Layout of a code set (the output of sign_codes, the input of the distance ops): an int64 matrix
// [units, words]. Row u holds the bits of unit u over the probe data: bit j is
// 1[x[o, u, i] > 0] with j = o * inner + i, where o runs over the dimensions of x before the unit
// dimension and i over those after it (row-major, the order of flatten()). Bit j lives in word
// j / 64 at bit position j % 64 (least significant first); the bits after the last one of a row
// are zero, so distances between code sets of the same shape never count them.
#pragma once

#include <cstdint>
#include <vector>

#include "common/macros.h"

namespace koopfast {

constexpr int kBitsPerWord = 64;

KF_HOST_DEVICE KF_INLINE int64_t words_for_bits(int64_t bits) { return (bits + kBitsPerWord - 1) / kBitsPerWord; }

// The pre-activations of sign_codes as a strided 3-D view [outer, units, inner].
struct SignInput {
  const void* data = nullptr;
  int64_t outer = 0, units = 0, inner = 0;
  int64_t outer_stride = 0, unit_stride = 0, inner_stride = 0;  // in elements
  int64_t bits() const { return outer * inner; }                 // per unit
};

// One code matrix [rows, words] with element strides (rows = units).
struct CodeMatrix {
  const int64_t* data = nullptr;
  int64_t rows = 0;
  int64_t words = 0;
  int64_t row_stride = 0;
  int64_t word_stride = 0;

  KF_HOST_DEVICE KF_INLINE int64_t at(int64_t r, int64_t k) const { return data[r * row_stride + k * word_stride]; }
};

// A unit of parallel work of hamming_distance: whole rows [row_begin, row_end) of a short-row
// matrix, or a word range [word_begin, word_end) of a single row of a long-row matrix. Built from
// the shapes alone (make_code_chunks), so results never depend on the thread or block count.
struct CodeChunk {
  int64_t tensor = 0;
  int64_t row_begin = 0, row_end = 0;
  int64_t word_begin = 0, word_end = 0;
};

constexpr int64_t kChunkWords = int64_t{1} << 12;  // 32 KiB of codes per chunk and operand

// Chunks of about kChunkWords words covering every word of every matrix exactly once.
inline std::vector<CodeChunk> make_code_chunks(const std::vector<CodeMatrix>& mats, int64_t chunk_words = kChunkWords) {
  std::vector<CodeChunk> chunks;
  for (size_t t = 0; t < mats.size(); ++t) {
    const CodeMatrix& m = mats[t];
    if (m.rows == 0 || m.words == 0) continue;
    if (m.words >= chunk_words) {
      for (int64_t r = 0; r < m.rows; ++r) {
        for (int64_t k = 0; k < m.words; k += chunk_words) {
          const int64_t end = k + chunk_words < m.words ? k + chunk_words : m.words;
          chunks.push_back({static_cast<int64_t>(t), r, r + 1, k, end});
        }
      }
    } else {
      const int64_t rows_per_chunk = chunk_words / m.words;
      for (int64_t r = 0; r < m.rows; r += rows_per_chunk) {
        const int64_t end = r + rows_per_chunk < m.rows ? r + rows_per_chunk : m.rows;
        chunks.push_back({static_cast<int64_t>(t), r, end, 0, m.words});
      }
    }
  }
  return chunks;
}

// Packs eight 0/1 bytes (byte t = flag t, least significant byte first) into eight bits (bit t).
// Each flag lands on bit 56 + t of the product; no two partial products share a bit, so nothing
// carries into the top byte.
KF_HOST_DEVICE KF_INLINE uint64_t pack_flag_bytes(uint64_t bytes) { return (bytes * 0x0102040810204080ull) >> 56; }

}  // namespace koopfast
