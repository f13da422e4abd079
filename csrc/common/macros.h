// Portability macros shared by host (C++) and device (CUDA) code. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define KF_HOST_DEVICE __host__ __device__
#define KF_INLINE __forceinline__
#else
#define KF_HOST_DEVICE
#define KF_INLINE inline __attribute__((always_inline))
#endif
