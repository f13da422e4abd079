// The only TORCH_LIBRARY block: every koopfast op schema, and the Python module koopfast._C.
//
// Importing koopfast._C runs these registrations (and each backend file's TORCH_LIBRARY_IMPL).
// Tensors cross into C++ through the dispatcher only; pybind11 carries plain build information.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifndef KF_TORCH_VERSION
#define KF_TORCH_VERSION "unknown"
#endif
#ifndef KF_CUDA_ARCHS
#define KF_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(koopfast, m) {
  m.set_python_module("koopfast.ops");

  // ---- threshold selection (csrc/select) ----
  // The k-th largest score over all elements of all tensors in a (no concatenated copy), with
  // score one of 'value' (a), 'abs' (|a|), 'product' (a*b), 'abs_product' (|a*b|),
  // 'square_times_abs' (a*a*|b|) computed in float64 if any tensor is float64, else float32.
  // threshold: 0-dim, compute dtype. stats: int64[4] = (number of scores > threshold, number equal
  // to it, how many of those the top k keeps, index of the first tensor with a NaN score or -1).
  m.def("select_threshold(Tensor[] a, Tensor[] b, str score, int k) -> (Tensor threshold, Tensor stats)");
  // Bool masks shaped like a: score > threshold, plus the first `ties kept` scores equal to it in
  // (tensor, flat index) order, so exactly k are True overall.
  m.def("topk_mask(Tensor[] a, Tensor[] b, str score, Tensor threshold, Tensor stats) -> Tensor[]");

  // ---- masks (csrc/masks) ----
  // Packed format: ceil(n / 8) uint8 bytes, bit i of byte j = element 8j + i in logical
  // (row-major) order, i.e. numpy.packbits(bitorder="little"); bits past n are 0.
  // Bool masks (any shapes and strides) -> packed masks (1-D uint8, contiguous).
  m.def("pack_masks(Tensor[] masks) -> Tensor[]");
  // Packed masks of numels[i] elements -> 1-D contiguous bool masks of numels[i] elements.
  m.def("unpack_masks(Tensor[] packed, int[] numels) -> Tensor[]");
  // int64[len(masks)]: the number of True elements of each mask, bool (numels[i] must be its
  // numel) or packed (numels[i] elements; bits past them are ignored).
  m.def("count_masks(Tensor[] masks, int[] numels) -> Tensor");
  // In place, in one pass over all targets (parameters, gradients, optimizer states...): sets to
  // +0 the elements of targets[i] where masks[mask_index[i]] is False. A mask is bool with the
  // target's shape, or packed. Targets are floating-point, must not share memory, and may share
  // masks.
  m.def("apply_masks(Tensor(a!)[] targets, Tensor[] masks, int[] mask_index) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  std::vector<std::string> backends{"cpu"};
#ifdef KF_WITH_CUDA
  backends.emplace_back("cuda");
  info["cuda_version"] = KF_TORCH_CUDA_VERSION;
#else
  info["cuda_version"] = pybind11::none();
#endif
  info["backends"] = backends;
  info["cuda_archs"] = std::string(KF_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = pybind11::none();
#endif
  info["torch_version"] = KF_TORCH_VERSION;
  info["compiler"] = std::string(__VERSION__);
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "koopfast compiled core: importing it registers the torch.ops.koopfast operators.";
  m.def("build_info", &build_info,
        "What this module was compiled with: backends, OpenMP version, CUDA version and architectures, "
        "the torch version it was built against, compiler.");
}
