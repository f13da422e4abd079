// Snapshot storage of a parameter trajectory: the torch-free contract shared by both backends.
//
// A trajectory buffer W is a [capacity, N] tensor of storage dtype S (float32, bfloat16 or
// float16): row t holds one snapshot of all N parameters, flattened in a fixed order. With an
// anchor a (float32 [N]), rows hold deltas: snapshot t is a + W[t]. Every Koopman quantity is a
// few passes over W (papers.md, "Everything is Y·c"):
//
//   ingest   write round_S(θ - a) into row `slot` and, in the same pass, the float64 inner products
//            of the new row with the rows in `dot_slots`, with itself, and with the anchor: one new
//            row of the Gram matrix. One read of θ and of the other rows, one write of the new row.
//            A non-finite θ (or one beyond the storage dtype's range) is reported and leaves row
//            `slot` unspecified, other rows untouched: callers write into a free row (the
//            recorder keeps a spare one), so a failed ingest loses nothing.
//   combine  out[j] = sum_t c[t, j] * (a + W[t])  (real or complex c), accumulated in float64.
//   dots     out[t, j] = <W[t], v_j>, and <a, v_j> as an extra last row, in float64.
//
// Sums run over fixed-size chunks whose partial results are added in chunk order, so results do
// not depend on the number of threads (a resumed recording reproduces an uninterrupted one bit
// for bit).
#pragma once

#include <cstdint>

namespace koopfast {

// Elements per chunk of the ingest and dots passes (partial dot products are kept per chunk).
constexpr int64_t kIngestChunk = int64_t{1} << 18;
// Elements per block within an ingest or dots chunk: each block's dot products are one
// dot_f64 (common/sum_order.h), added to the chunk's partial sums in block order. The CUDA kernels
// follow the same chunks, blocks and lanes, so both backends round alike.
constexpr int64_t kDotBlock = 8192;
// Elements per chunk of the combine pass.
constexpr int64_t kCombineChunk = int64_t{1} << 12;

// Layout of ingest's float64 output after the dot_slots entries.
enum IngestDot : int32_t { kSelfDot = 0, kAnchorDot = 1, kNumExtraDots = 2 };

}  // namespace koopfast
