// Compile-time dispatch on runtime tags, shared by the host-side loops of every kernel family.
//
// Each helper calls f with a tag value whose type carries the compile-time choice:
//   dispatch_float(dtype, [&](auto tag) { using S = typename decltype(tag)::type; ... });
//   dispatch_score(kind,  [&](auto tag) { constexpr ScoreKind K = decltype(tag)::value; ... });
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common/tensor_view.h"
#include "common/score.h"

namespace koopfast {

template <class T>
struct TypeTag {
  using type = T;
};

template <class F>
decltype(auto) dispatch_float(DType d, F&& f) {
  switch (d) {
    case DType::Float16: return f(TypeTag<c10::Half>{});
    case DType::BFloat16: return f(TypeTag<c10::BFloat16>{});
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    default: TORCH_CHECK(false, "koopfast: internal error: not a floating dtype");
  }
}

template <class F>
decltype(auto) dispatch_score(ScoreKind k, F&& f) {
  switch (k) {
    case ScoreKind::Value: return f(std::integral_constant<ScoreKind, ScoreKind::Value>{});
    case ScoreKind::Abs: return f(std::integral_constant<ScoreKind, ScoreKind::Abs>{});
    case ScoreKind::Product: return f(std::integral_constant<ScoreKind, ScoreKind::Product>{});
    case ScoreKind::AbsProduct: return f(std::integral_constant<ScoreKind, ScoreKind::AbsProduct>{});
    case ScoreKind::SquareTimesAbs: return f(std::integral_constant<ScoreKind, ScoreKind::SquareTimesAbs>{});
  }
  TORCH_CHECK(false, "koopfast: internal error: unknown score kind");
}

// Widens a stored value to the compute type (half and bfloat16 through float, which is exact).
template <class C, class S>
KF_HOST_DEVICE KF_INLINE C widen(S x) {
  if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<S, c10::BFloat16>) {
    return static_cast<C>(static_cast<float>(x));
  } else {
    return static_cast<C>(x);
  }
}

}  // namespace koopfast
