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
  // The same per tensor, all tensors in one call: row t of stats [T, 4] and thresholds[t] select
  // the k[t] largest scores of a[t] alone (compute dtype as above, over the whole list), with
  // k[t] in [0, numel]; k[t] = 0 (also an empty a[t]) gives +inf with stats (0, number of scores
  // equal to +inf, 0, NaN). The NaN entry of row t is 0 (a[t] holds a NaN score) or -1.
  m.def(
      "select_threshold_per_tensor(Tensor[] a, Tensor[] b, str score, int[] k)"
      " -> (Tensor thresholds, Tensor stats)");
  m.def("topk_mask_per_tensor(Tensor[] a, Tensor[] b, str score, Tensor thresholds, Tensor stats) -> Tensor[]");
  // Semi-structured N:M masks (contract in select/nm.h): for each 2-D a[i] [rows, cols], bool
  // [rows, cols] keeping the n largest scores of every group of m consecutive columns (a trailing
  // group of r < m keeps min(n, r)); ties keep the lower column. nan_tensor: int64[1], the index of
  // the first tensor with a NaN score (its mask rows there are unspecified), or -1.
  m.def("nm_masks(Tensor[] a, Tensor[] b, str score, int n, int m) -> (Tensor[] masks, Tensor nan_tensor)");

  // ---- parameter trajectories (csrc/trajectory; contract in trajectory.h) ----
  // snapshots: [capacity, N] float32/bfloat16/float16; anchor: optional float32 [N] (rows are
  // deltas against it). Writes round(θ - anchor) into row `slot`; dots (float64): with each row of
  // dot_slots, then with itself, then with the anchor. status: int64[1], -1, or the index of the
  // first tensor of params with a non-finite value (then row `slot` is unspecified, dots are 0).
  m.def(
      "trajectory_ingest(Tensor[] params, Tensor(a!) snapshots, int slot, int[] dot_slots, Tensor? anchor)"
      " -> (Tensor dots, Tensor status)");
  // sum_t coeffs[t, j] * (anchor + snapshots[t]) for each column j: [m, N]; float32 (complex64 for
  // complex coefficients), or float64 (complex128) if wide. Accumulated in float64.
  m.def("trajectory_combine(Tensor snapshots, Tensor coeffs, Tensor? anchor, bool wide=False) -> Tensor");
  // float64 [capacity (+1 with an anchor), m]: <snapshots[t], vectors[j]>, and <anchor, vectors[j]>.
  m.def("trajectory_dots(Tensor snapshots, Tensor vectors, Tensor? anchor) -> Tensor");

  // ---- region codes (csrc/codes) ----
  // Bit-packed signs of pre-activations: int64 codes [units, words] with units = x.size(dim); bit
  // j = o * inner + i of row u is 1[x[o, u, i] > 0] (o over the dims before dim, i over those
  // after, row-major), stored in word j / 64 at bit j % 64; words = ceil(bits / 64) and the bits
  // past the last are 0. x: float16/bfloat16/float32/float64 (NaN gives 0) or bool.
  m.def("sign_codes(Tensor x, int dim) -> Tensor");
  // Per row (unit) of each code matrix a[i] [units, words]: the number of differing bits from
  // b[i] (same shape), or the number of set bits if b is empty. int64 [units] per tensor.
  m.def("hamming_distance(Tensor[] a, Tensor[] b) -> Tensor[]");
  // All-pairs distances between the rows (units) of one code matrix: int64 [units, units],
  // symmetric with a zero diagonal.
  m.def("pairwise_hamming(Tensor codes) -> Tensor");

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
