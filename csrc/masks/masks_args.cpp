#include "masks/masks_args.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/views.h"

namespace koopfast {
namespace {


void check_device(const char* op, const c10::Device& device, const at::Tensor& t, const char* arg, size_t i,
                  const char* first) {
  KF_CHECK_VALUE(t.device() == device, op, "expected all tensors on one device, got ", first, " on ", device, " and ",
                 arg, "[", i, "] on ", t.device());
}

// A packed mask of n logical elements: 1-D uint8 with ceil(n / 8) bytes.
void check_packed(const char* op, const at::Tensor& p, const char* arg, size_t i, int64_t n, const char* whose) {
  KF_CHECK_VALUE(p.dim() == 1 && p.size(0) == packed_bytes(n), op, "expected ", arg, "[", i, "] to have shape [",
                 packed_bytes(n), "] (", whose, n, " elements packed 8 per byte), got shape ", p.sizes());
}

void check_numels(const char* op, at::IntArrayRef numels, size_t count, const char* arg) {
  KF_CHECK_VALUE(numels.size() == count, op, "expected numels to hold one entry per tensor of ", arg, " (", count,
                 "), got ", numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    KF_CHECK_VALUE(numels[i] >= 0, op, "expected numels[", i, "] to be >= 0, got ", numels[i]);
  }
}

// [first byte, one past the last byte) of the memory a tensor's elements occupy.
std::pair<uintptr_t, uintptr_t> extent(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// Two targets writing the same memory through different masks would race.
void check_no_shared_memory(const char* op, at::TensorList targets) {
  std::vector<std::tuple<uintptr_t, uintptr_t, size_t>> spans;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (targets[i].numel() == 0) continue;
    const auto [b, e] = extent(targets[i]);
    spans.emplace_back(b, e, i);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t s = 1; s < spans.size(); ++s) {
    const auto& [pb, pe, pi] = spans[s - 1];
    const auto& [b, e, i] = spans[s];
    KF_CHECK_VALUE(b >= pe, op, "expected targets not to share memory, got targets[", std::min(pi, i),
                   "] and targets[", std::max(pi, i), "] overlapping");
  }
}

}  // namespace

MaskLists prepare_pack(const char* op, at::TensorList masks) {
  MaskLists in;
  for (size_t i = 0; i < masks.size(); ++i) {
    const at::Tensor& m = masks[i];
    KF_CHECK_TYPE(m.scalar_type() == c10::kBool, op, "expected masks[", i, "] to be bool, got ", m.scalar_type());
    check_device(op, masks[0].device(), m, "masks", i, "masks[0]");
    in.a.push_back(make_view(m, op, "masks", in.keep_alive));
    in.numels.push_back(m.numel());
    in.total += m.numel();
  }
  return in;
}

MaskLists prepare_unpack(const char* op, at::TensorList packed, at::IntArrayRef numels) {
  check_numels(op, numels, packed.size(), "packed");
  MaskLists in;
  for (size_t i = 0; i < packed.size(); ++i) {
    const at::Tensor& p = packed[i];
    KF_CHECK_TYPE(p.scalar_type() == c10::kByte, op, "expected packed[", i, "] to be uint8, got ", p.scalar_type());
    check_device(op, packed[0].device(), p, "packed", i, "packed[0]");
    check_packed(op, p, "packed", i, numels[i], "numels[i] = ");
    in.a.push_back(make_view(p, op, "packed", in.keep_alive));
    in.numels.push_back(numels[i]);
    in.total += numels[i];
  }
  return in;
}

MaskLists prepare_count(const char* op, at::TensorList masks, at::IntArrayRef numels) {
  check_numels(op, numels, masks.size(), "masks");
  MaskLists in;
  for (size_t i = 0; i < masks.size(); ++i) {
    const at::Tensor& m = masks[i];
    check_device(op, masks[0].device(), m, "masks", i, "masks[0]");
    if (m.scalar_type() == c10::kByte) {
      check_packed(op, m, "masks", i, numels[i], "numels[i] = ");
    } else {
      KF_CHECK_TYPE(m.scalar_type() == c10::kBool, op, "expected masks[", i,
                    "] to be bool, or uint8 (packed), got ", m.scalar_type());
      KF_CHECK_VALUE(m.numel() == numels[i], op, "expected masks[", i, "] to have numels[", i, "] = ", numels[i],
                     " elements, got ", m.numel());
    }
    in.a.push_back(make_view(m, op, "masks", in.keep_alive));
    in.numels.push_back(numels[i]);
    in.total += numels[i];
  }
  return in;
}

MaskLists prepare_apply(const char* op, at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_index) {
  KF_CHECK_VALUE(mask_index.size() == targets.size(), op, "expected mask_index to hold one entry per target (",
                 targets.size(), "), got ", mask_index.size());
  MaskLists in;
  if (targets.empty()) return in;
  const c10::Device device = targets[0].device();
  for (size_t j = 0; j < masks.size(); ++j) {
    KF_CHECK_TYPE(masks[j].scalar_type() == c10::kBool || masks[j].scalar_type() == c10::kByte, op, "expected masks[",
                  j, "] to be bool, or uint8 (packed), got ", masks[j].scalar_type());
    check_device(op, device, masks[j], "masks", j, "targets[0]");
  }
  std::vector<TensorView> mask_views;
  for (const auto& m : masks) mask_views.push_back(make_view(m, op, "masks", in.keep_alive));
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& t = targets[i];
    KF_CHECK_TYPE(is_floating(t.scalar_type()), op, "expected targets[", i,
                  "] to be float16, bfloat16, float32 or float64, got ", t.scalar_type());
    check_device(op, device, t, "targets", i, "targets[0]");
    KF_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, "expected targets[", i,
                   "] to have no internal overlap (an expanded or broadcast view cannot be written), got strides ",
                   t.strides());
    const int64_t j = mask_index[i];
    KF_CHECK_VALUE(j >= 0 && j < static_cast<int64_t>(masks.size()), op, "expected mask_index[", i, "] in [0, ",
                   masks.size(), ") (an index into masks), got ", j);
    const at::Tensor& m = masks[j];
    if (m.scalar_type() == c10::kByte) {
      KF_CHECK_VALUE(m.dim() == 1 && m.size(0) == packed_bytes(t.numel()), op, "expected masks[", j,
                     "] (packed, for targets[", i, "] of ", t.numel(), " elements) to have shape [",
                     packed_bytes(t.numel()), "], got shape ", m.sizes());
    } else {
      KF_CHECK_VALUE(m.sizes() == t.sizes(), op, "expected masks[", j, "] to have the shape of targets[", i, "] ",
                     t.sizes(), ", got ", m.sizes());
    }
    const size_t copies = in.keep_alive.size();
    in.a.push_back(make_view(t, op, "targets", in.keep_alive));
    // A view with more strided dimensions than a TensorView holds is read through a copy,
    // which for a target would silently drop the writes.
    KF_CHECK_VALUE(in.keep_alive.size() == copies, op, "expected targets[", i, "] to have at most ", kMaxDims,
                   " dimensions after merging contiguous ones, got strides ", t.strides());
    in.b.push_back(mask_views[j]);
    in.numels.push_back(t.numel());
    in.total += t.numel();
  }
  check_no_shared_memory(op, targets);
  return in;
}

// ---- devices without a kernel, and calls without any tensor -----------------------------------------
// The dispatcher routes both here. An empty list is a valid call with an empty result; tensors
// on a device without a kernel get the reason instead of a dispatcher dump.
namespace {

[[noreturn]] void no_kernel(const char* op, const at::Tensor& first) { no_kernel_for(op, first.device()); }

std::vector<at::Tensor> pack_masks_no_kernel(at::TensorList masks) {
  if (!masks.empty()) no_kernel("pack_masks", masks[0]);
  return {};
}

std::vector<at::Tensor> unpack_masks_no_kernel(at::TensorList packed, at::IntArrayRef numels) {
  check_numels("unpack_masks", numels, packed.size(), "packed");
  if (!packed.empty()) no_kernel("unpack_masks", packed[0]);
  return {};
}

at::Tensor count_masks_no_kernel(at::TensorList masks, at::IntArrayRef numels) {
  check_numels("count_masks", numels, masks.size(), "masks");
  if (!masks.empty()) no_kernel("count_masks", masks[0]);
  return at::empty({0}, at::TensorOptions().dtype(c10::kLong));
}

void apply_masks_no_kernel(at::TensorList targets, at::TensorList masks, at::IntArrayRef mask_index) {
  KF_CHECK_VALUE(mask_index.size() == targets.size(), "apply_masks", "expected mask_index to hold one entry per target (",
                 targets.size(), "), got ", mask_index.size());
  if (!targets.empty()) no_kernel("apply_masks", targets[0]);
  if (!masks.empty()) no_kernel("apply_masks", masks[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(koopfast, CompositeExplicitAutograd, m) {
  m.impl("pack_masks", &pack_masks_no_kernel);
  m.impl("unpack_masks", &unpack_masks_no_kernel);
  m.impl("count_masks", &count_masks_no_kernel);
  m.impl("apply_masks", &apply_masks_no_kernel);
}

}  // namespace koopfast
