#include "common/views.h"

#include "common/checks.h"

namespace koopfast {

DType to_dtype(c10::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case c10::ScalarType::Half: return DType::Float16;
    case c10::ScalarType::BFloat16: return DType::BFloat16;
    case c10::ScalarType::Float: return DType::Float32;
    case c10::ScalarType::Double: return DType::Float64;
    case c10::ScalarType::Bool: return DType::Bool;
    case c10::ScalarType::Byte: return DType::UInt8;
    case c10::ScalarType::Long: return DType::Int64;
    default: break;
  }
  KF_CHECK_TYPE(false, op, "expected ", arg, " to have a floating-point, bool, uint8 or int64 dtype, got ", t);
  return DType::Float32;  // unreachable
}

TensorView make_view(const at::Tensor& t, const char* op, const char* arg, std::vector<at::Tensor>& keep_alive) {
  TensorView v;
  v.dtype = to_dtype(t.scalar_type(), op, arg);
  v.numel = t.numel();
  if (v.numel == 0) {  // nothing to walk, whatever its shape (and any number of dimensions)
    v.data = t.data_ptr();
    v.ndim = 1;
    v.sizes[0] = 0;
    v.strides[0] = 1;
    return v;
  }
  // Coalesce from the innermost dimension outwards, dropping size-1 dimensions. A tensor that
  // still needs more than kMaxDims strided dimensions is walked through a contiguous copy.
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
  int nd = 0;
  bool fits = true;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    const int64_t s = t.size(d);
    const int64_t st = t.stride(d);
    if (s == 1) continue;
    if (nd > 0 && st == strides[nd - 1] * sizes[nd - 1]) {
      sizes[nd - 1] *= s;  // contiguous with the inner run
      continue;
    }
    if (nd == kMaxDims) {
      fits = false;
      break;
    }
    sizes[nd] = s;
    strides[nd] = st;
    ++nd;
  }
  if (!fits) {
    keep_alive.push_back(t.contiguous());
    v.data = keep_alive.back().data_ptr();
    v.ndim = 1;
    v.sizes[0] = v.numel;
    v.strides[0] = 1;
    return v;
  }
  if (nd == 0) {  // a single element
    sizes[0] = 1;
    strides[0] = 1;
    nd = 1;
  }
  v.data = t.data_ptr();
  v.ndim = nd;
  for (int i = 0; i < nd; ++i) {  // reverse back to outermost-first
    v.sizes[i] = sizes[nd - 1 - i];
    v.strides[i] = strides[nd - 1 - i];
  }
  return v;
}

}  // namespace koopfast
