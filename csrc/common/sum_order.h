// The fixed addition order of koopfast's float64 dot products, shared by the CPU kernels
// (cpu_reduce.cpp) and the CUDA kernels that reproduce their rounding bit for bit.
//
// A dot product over n elements keeps kDotLanes partial sums: lane k adds the products of
// elements k, k + kDotLanes, k + 2 kDotLanes, ... in increasing order, starting from +0; the lanes
// are then combined by combine_lanes. Torch-free.
#pragma once

#include "common/macros.h"

namespace koopfast {

constexpr int kDotLanes = 8;

KF_HOST_DEVICE KF_INLINE double combine_lanes(const double* acc) {
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

}  // namespace koopfast
