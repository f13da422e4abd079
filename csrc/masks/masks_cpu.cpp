// CPU backend of the mask ops: at::parallel_for over fixed-size chunks of all tensors.
//
// Chunks start at multiples of 2^16 logical elements within each tensor, so a chunk covers
// whole packed bytes (and whole 64-element blocks) except at the end of a tensor: chunks never
// share an output byte. Contiguous tensors take block loops that the compiler vectorizes;
// strided ones a per-run loop over logical order.
//
// apply_masks works on 64-element blocks (8 mask bytes, lane masks from a 256-entry table) and
// writes a block back only if some pruned element in it is not already +0: re-applying a mask to
// a tensor whose pruned entries are still zero (parameters after a masked-gradient step) moves
// half the bytes (a read, no write-back). Measured on the 2-core development machine it is not
// yet faster than a first application (bench/RESULTS.md): the check loop, not memory, limits it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/chunks.h"
#include "common/cpu_loops.h"
#include "masks/masks_args.h"

namespace koopfast {
namespace {

constexpr int64_t kBlock = 64;
// Below this many elements in all, one thread does the work: these loops stream at about one
// element per nanosecond, so waking a second thread (tens of microseconds, far more when the
// cores are shared) costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 17;

template <class F>
void for_each_chunk(const MaskLists& in, F&& f) {
  const std::vector<Chunk> chunks = make_chunks(in.numels);
  const auto body = [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(c, chunks[c]);
  };
  if (in.total < kParallelMinElements) {
    body(0, static_cast<int64_t>(chunks.size()));
  } else {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, body);
  }
}

// Calls f(TypeTag<U>) with U the unsigned integer of the element size of a floating dtype.
template <class F>
void dispatch_bits(DType d, F&& f) {
  switch (element_bytes(d)) {
    case 2: return f(TypeTag<uint16_t>{});
    case 4: return f(TypeTag<uint32_t>{});
    case 8: return f(TypeTag<uint64_t>{});
    default: TORCH_CHECK(false, "koopfast: internal error: not a floating dtype");
  }
}

// ---- pack ---------------------------------------------------------------------------------------------

void pack_chunk(const TensorView& m, const Chunk& ch, uint8_t* out) {
  const int64_t first = ch.begin >> 3;
  const int64_t last = packed_bytes(ch.end);  // one past
  if (m.contiguous()) {
    const uint8_t* src = static_cast<const uint8_t*>(m.data);
    const int64_t full = ch.end >> 3;  // bytes with all 8 elements inside [begin, end)
    for (int64_t j = first; j < full; ++j) {
      uint64_t w;
      std::memcpy(&w, src + 8 * j, 8);
      out[j] = pack8(w);
    }
    if (full < last) {
      uint8_t b = 0;
      for (int64_t i = 8 * full; i < ch.end; ++i) b |= static_cast<uint8_t>(src[i] << (i & 7));
      out[full] = b;
    }
    return;
  }
  std::memset(out + first, 0, static_cast<size_t>(last - first));
  const uint8_t* src = static_cast<const uint8_t*>(m.data);
  for_each_run(m, ch.begin, ch.end, [&](int64_t off, int64_t stride, int64_t n, int64_t flat) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = flat + k;
      out[i >> 3] |= static_cast<uint8_t>(src[off + k * stride] << (i & 7));
    }
  });
}

std::vector<at::Tensor> pack_masks_cpu(at::TensorList masks) {
  const MaskLists in = prepare_pack("pack_masks", masks);
  std::vector<at::Tensor> out;
  std::vector<uint8_t*> dst;
  for (const auto& m : masks) {
    out.push_back(at::empty({packed_bytes(m.numel())}, m.options().dtype(c10::kByte)));
    dst.push_back(out.back().data_ptr<uint8_t>());
  }
  for_each_chunk(in, [&](int64_t, const Chunk& ch) { pack_chunk(in.a[ch.tensor], ch, dst[ch.tensor]); });
  return out;
}

// ---- unpack -------------------------------------------------------------------------------------------

std::vector<at::Tensor> unpack_masks_cpu(at::TensorList packed, at::IntArrayRef numels) {
  const MaskLists in = prepare_unpack("unpack_masks", packed, numels);
  std::vector<at::Tensor> out;
  std::vector<uint8_t*> dst;
  for (size_t i = 0; i < packed.size(); ++i) {
    out.push_back(at::empty({numels[i]}, packed[i].options().dtype(c10::kBool)));
    dst.push_back(reinterpret_cast<uint8_t*>(out.back().data_ptr<bool>()));
  }
  for_each_chunk(in, [&](int64_t, const Chunk& ch) {
    const TensorView& p = in.a[ch.tensor];
    const uint8_t* bits = static_cast<const uint8_t*>(p.data);
    const int64_t s = p.strides[0];
    uint8_t* o = dst[ch.tensor];
    for (int64_t j = ch.begin >> 3; j < packed_bytes(ch.end); ++j) {
      const uint64_t w = unpack8(bits[j * s]);
      const int64_t n = std::min<int64_t>(8, ch.end - 8 * j);
      std::memcpy(o + 8 * j, &w, static_cast<size_t>(n));
    }
  });
  return out;
}

// ---- count --------------------------------------------------------------------------------------------

int64_t count_chunk(const TensorView& m, const Chunk& ch) {
  const uint8_t* src = static_cast<const uint8_t*>(m.data);
  int64_t count = 0;
  if (is_packed(m)) {
    const int64_t s = m.strides[0];
    const int64_t full = ch.end >> 3;
    int64_t j = ch.begin >> 3;
    if (s == 1) {
      for (; j + 8 <= full; j += 8) {
        uint64_t w;
        std::memcpy(&w, src + j, 8);
        count += __builtin_popcountll(w);
      }
    }
    for (; j < full; ++j) count += __builtin_popcount(src[j * s]);
    if (full < packed_bytes(ch.end)) count += __builtin_popcount(src[full * s] & tail_bits(ch.end));
    return count;
  }
  for_each_run(m, ch.begin, ch.end, [&](int64_t off, int64_t stride, int64_t n, int64_t) {
    uint32_t c = 0;  // a run of one chunk holds at most 2^16 elements
    if (stride == 1) {
      for (int64_t k = 0; k < n; ++k) c += src[off + k];
    } else {
      for (int64_t k = 0; k < n; ++k) c += src[off + k * stride];
    }
    count += c;
  });
  return count;
}

at::Tensor count_masks_cpu(at::TensorList masks, at::IntArrayRef numels) {
  const MaskLists in = prepare_count("count_masks", masks, numels);
  const std::vector<Chunk> chunks = make_chunks(in.numels);
  std::vector<int64_t> per_chunk(chunks.size(), 0);
  for_each_chunk(in, [&](int64_t c, const Chunk& ch) { per_chunk[c] = count_chunk(in.a[ch.tensor], ch); });
  at::Tensor counts = at::zeros({static_cast<int64_t>(masks.size())}, at::TensorOptions().dtype(c10::kLong));
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] += per_chunk[c];
  return counts;
}

// ---- apply --------------------------------------------------------------------------------------------

// lanes[b][k]: all ones if bit k of mask byte b is 0 (element k pruned), else 0. One table
// lookup turns a mask byte into the 8 lane masks that vectorized loops need.
template <class U>
struct PrunedLanes {
  U lanes[256][8];
  constexpr PrunedLanes() : lanes() {
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) lanes[b][k] = ((b >> k) & 1) ? U(0) : static_cast<U>(~U(0));
    }
  }
};
template <class U>
constexpr PrunedLanes<U> kPrunedLanes{};

// Some pruned element of the 64-element block x (mask bytes `bits`) has a nonzero bit.
// (Both loops are shaped for the compiler's vectorizer: one accumulator per lane, and loads and
// stores through a local array; a single accumulator or `x[i] &= ...` compile to scalar code.)
template <class U>
KF_INLINE bool block_dirty(const U* x, const uint8_t* bits) {
  U dirty[8] = {};
  for (int w = 0; w < 8; ++w) {
    const U* lane = kPrunedLanes<U>.lanes[bits[w]];
    for (int k = 0; k < 8; ++k) dirty[k] |= x[8 * w + k] & lane[k];
  }
  U any = 0;
  for (int k = 0; k < 8; ++k) any |= dirty[k];
  return any != 0;
}

template <class U>
KF_INLINE void zero_block(U* x, const uint8_t* bits) {
  for (int w = 0; w < 8; ++w) {
    const U* lane = kPrunedLanes<U>.lanes[bits[w]];
    U kept[8];
    for (int k = 0; k < 8; ++k) kept[k] = x[8 * w + k] & static_cast<U>(~lane[k]);
    for (int k = 0; k < 8; ++k) x[8 * w + k] = kept[k];
  }
}

// After a block that needed writing, the next kDirtyRun blocks are written without checking,
// so that a first application (every block dirty) runs as one read-and-write pass.
constexpr int kDirtyRun = 15;

// Contiguous target, contiguous bool mask or packed mask (byte stride s).
template <class U>
KF_INLINE void apply_contiguous_body(U* x, const uint8_t* mask, bool packed, int64_t s, int64_t begin, int64_t end) {
  alignas(8) uint8_t bytes[8];
  int run = 0;
  int64_t i = begin;  // a multiple of kBlock: chunks start at multiples of 2^16
  for (; i + kBlock <= end; i += kBlock) {
    const uint8_t* bits = bytes;
    if (packed && s == 1) {
      bits = mask + (i >> 3);
    } else if (packed) {
      for (int w = 0; w < 8; ++w) bytes[w] = mask[((i >> 3) + w) * s];
    } else {
      for (int w = 0; w < 8; ++w) {
        uint64_t eight;
        std::memcpy(&eight, mask + i + 8 * w, 8);
        bytes[w] = pack8(eight);
      }
    }
    if (run > 0) {
      zero_block<U>(x + i, bits);
      --run;
    } else if (block_dirty<U>(x + i, bits)) {
      zero_block<U>(x + i, bits);
      run = kDirtyRun;
    }
  }
  for (; i < end; ++i) {
    if (!(packed ? packed_bit(mask, s, i) : mask[i] != 0)) x[i] = U(0);
  }
}

template <class U>
void apply_contiguous(U* x, const uint8_t* mask, bool packed, int64_t s, int64_t begin, int64_t end) {
  apply_contiguous_body<U>(x, mask, packed, s, begin, end);
}

template <class U>
void apply_chunk(const TensorView& t, const TensorView& m, const Chunk& ch) {
  U* x = static_cast<U*>(t.data);
  const uint8_t* mask = static_cast<const uint8_t*>(m.data);
  const bool packed = is_packed(m);
  if (t.contiguous() && (packed || m.contiguous())) {
    apply_contiguous<U>(x, mask, packed, packed ? m.strides[0] : 1, ch.begin, ch.end);
    return;
  }
  if (packed) {
    const int64_t s = m.strides[0];
    for_each_run(t, ch.begin, ch.end, [&](int64_t off, int64_t stride, int64_t n, int64_t flat) {
      for (int64_t k = 0; k < n; ++k) {
        if (!packed_bit(mask, s, flat + k)) x[off + k * stride] = U(0);
      }
    });
    return;
  }
  for_each_pair_run(t, &m, ch.begin, ch.end, [&](int64_t ot, int64_t st, int64_t om, int64_t sm, int64_t n, int64_t) {
    for (int64_t k = 0; k < n; ++k) {
      if (!mask[om + k * sm]) x[ot + k * st] = U(0);
    }
  });
}

void apply_masks_cpu(at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_index) {
  const MaskLists in = prepare_apply("apply_masks", targets, masks, mask_index);
  for_each_chunk(in, [&](int64_t, const Chunk& ch) {
    const TensorView& t = in.a[ch.tensor];
    dispatch_bits(t.dtype, [&](auto tag) {
      using U = typename decltype(tag)::type;
      apply_chunk<U>(t, in.b[ch.tensor], ch);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CPU, m) {
  m.impl("pack_masks", &pack_masks_cpu);
  m.impl("unpack_masks", &unpack_masks_cpu);
  m.impl("count_masks", &count_masks_cpu);
  m.impl("apply_masks", &apply_masks_cpu);
}

}  // namespace koopfast
