// Argument checks with messages of one form: "koopfast::<op>: expected <arg> to be <X>, got <Y>".
// The exception type follows Python conventions: TypeError for dtypes, ValueError for values,
// shapes and devices.
#pragma once

#include <c10/util/Exception.h>

#define KF_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "koopfast::", op, ": ", __VA_ARGS__)
#define KF_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "koopfast::", op, ": ", __VA_ARGS__)
