#include "cvig/tensor_io.h"

#include <cstring>

#include "cvig_hd.h"

namespace cvig {

void packFloats(float const* src, size_t n, IoType t, void* dst) {
    if (t == IoType::kFloat32) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    auto* h = static_cast<uint16_t*>(dst);
    for (size_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
}

void unpackFloats(void const* src, size_t n, IoType t, float* dst) {
    if (t == IoType::kFloat32) {
        std::memcpy(dst, src, n * sizeof(float));
        return;
    }
    auto const* h = static_cast<uint16_t const*>(src);
    for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
}

}  // namespace cvig
