// Argument checks with messages of one form: "koopfast::<op>: expected <arg> to be <X>, got <Y>".
// The exception type follows Python conventions: TypeError for dtypes, ValueError for values,
// shapes and devices.
#pragma once

#include <c10/util/Exception.h>

#define KF_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "koopfast::", op, ": ", __VA_ARGS__)
#define KF_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "koopfast::", op, ": ", __VA_ARGS__)

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace koopfast {

inline bool is_floating(c10::ScalarType t) {
  return t == c10::kHalf || t == c10::kBFloat16 || t == c10::kFloat || t == c10::kDouble;
}

// The dispatcher routes devices without a kernel of their own (and calls without any tensor) to
// each op's CompositeExplicitAutograd entry: fail there with the reason, not a dispatcher dump.
[[noreturn]] inline void no_kernel_for(const char* op, c10::Device device) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "koopfast::", op, ": no kernel for tensors on ", device,
                              " in this build of koopfast (see koopfast.build_info()['backends'])");
}

}  // namespace koopfast
