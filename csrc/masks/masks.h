// Masks: the bit-packed format and the per-element pieces shared by the CPU and CUDA backends.
//
// Packed format: a mask of n elements is ceil(n / 8) bytes; bit i of byte j (bit 0 = least
// significant) is element 8j + i of the mask in logical row-major order (the order of
// flatten()), whatever the strides of the tensor it was packed from. This is
// numpy.packbits(mask.ravel(), bitorder="little"): saved masks are portable and easy to check.
// Bits past n in the last byte are written as 0 and ignored when read.
//
// Applying a mask zeroes the pruned elements of a floating-point tensor by their bits: every
// pruned element becomes +0 (also a NaN, an infinity or -0 there), kept ones are untouched.
// Torch-free.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/tensor_view.h"

namespace koopfast {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the packed mask format assumes a little-endian host");

KF_HOST_DEVICE constexpr int64_t packed_bytes(int64_t n) { return (n + 7) / 8; }

// Eight bool bytes (each 0 or 1; element k in byte k of a little-endian word) -> one packed byte.
// The product moves bit 8k to bit 56 + k; no two partial products share a bit, so nothing carries.
KF_HOST_DEVICE KF_INLINE uint8_t pack8(uint64_t bools) {
  return static_cast<uint8_t>((bools * 0x0102040810204080ull) >> 56);
}

// One packed byte -> eight bool bytes (0 or 1), element k in byte k: the byte is replicated,
// byte k keeps only bit k, and adding 0x7F carries any set bit into the byte's top bit.
KF_HOST_DEVICE KF_INLINE uint64_t unpack8(uint8_t bits) {
  const uint64_t spread = (static_cast<uint64_t>(bits) * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((spread + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

// The bit of logical element i of a packed mask whose bytes are `stride` bytes apart.
KF_HOST_DEVICE KF_INLINE bool packed_bit(const uint8_t* bits, int64_t stride, int64_t i) {
  return (bits[(i >> 3) * stride] >> (i & 7)) & 1;
}

// Bits of the last byte of elements [.., end) that belong to the mask: all 8 unless end % 8 != 0.
KF_HOST_DEVICE KF_INLINE uint8_t tail_bits(int64_t end) {
  const int r = static_cast<int>(end & 7);
  return r == 0 ? uint8_t{0xFF} : static_cast<uint8_t>((1u << r) - 1u);
}

// Bytes per element of the floating dtypes a mask can be applied to (0 for the others).
KF_HOST_DEVICE constexpr int element_bytes(DType d) {
  return d == DType::Float16 || d == DType::BFloat16 ? 2 : d == DType::Float32 ? 4 : d == DType::Float64 ? 8 : 0;
}

// A mask is packed iff its view has dtype UInt8 (else it is bool, shaped like its target).
KF_HOST_DEVICE KF_INLINE bool is_packed(const TensorView& mask) { return mask.dtype == DType::UInt8; }

}  // namespace koopfast
