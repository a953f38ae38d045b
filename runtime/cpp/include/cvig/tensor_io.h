// Host-side staging of engine inputs and outputs in the engine's own I/O type: FP32, or FP16 for
// engines built from an FP16-I/O export (cvig-export --fp16-io). Conversions round to nearest even,
// the same routines the plugin kernels use (plugins/common/cvig_hd.h). No TensorRT needed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace cvig {

enum class IoType { kFloat32, kFloat16 };

inline size_t elementSize(IoType t) { return t == IoType::kFloat16 ? 2 : 4; }
inline char const* ioTypeName(IoType t) { return t == IoType::kFloat16 ? "float16" : "float32"; }

// float32 values -> n elements of type t at dst (elementSize(t) * n bytes)
void packFloats(float const* src, size_t n, IoType t, void* dst);
// n elements of type t at src -> float32 values
void unpackFloats(void const* src, size_t n, IoType t, float* dst);

}  // namespace cvig
