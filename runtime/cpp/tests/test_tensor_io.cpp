// Unit tests of the engine I/O staging (FP32 and FP16 engines), run by ctest in CI.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <vector>

#include "cvig/tensor_io.h"

#include "check.h"

static uint16_t half(float f) {
    uint16_t h = 0;
    cvig::packFloats(&f, 1, cvig::IoType::kFloat16, &h);
    return h;
}

int main() {
    CHECK(cvig::elementSize(cvig::IoType::kFloat32) == 4 && cvig::elementSize(cvig::IoType::kFloat16) == 2);
    // known encodings, round to nearest even
    CHECK(half(1.0f) == 0x3C00 && half(-2.0f) == 0xC000 && half(0.0f) == 0x0000);
    CHECK(half(65504.0f) == 0x7BFF && half(65519.0f) == 0x7BFF && half(65520.0f) == 0x7C00);  // overflow -> inf
    CHECK(half(std::ldexp(1.0f, -24)) == 0x0001);                                               // smallest subnormal
    CHECK(half(std::ldexp(1.0f, -25)) == 0x0000);                                               // tie -> even (0)
    CHECK(half(std::ldexp(3.0f, -25)) == 0x0002);                                               // tie -> even (2)
    CHECK(half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);                                        // tie -> even
    CHECK(half(1.0f + std::ldexp(3.0f, -11)) == 0x3C02);
    // every finite half survives unpack -> pack unchanged; values agree with the definition
    int bad = 0;
    for (uint32_t b = 0; b < 65536; ++b) {
        uint16_t const h = static_cast<uint16_t>(b);
        if ((h & 0x7C00) == 0x7C00) continue;  // inf / NaN
        float f = 0.f;
        cvig::unpackFloats(&h, 1, cvig::IoType::kFloat16, &f);
        int const e = (h >> 10) & 0x1F, m = h & 0x3FF;
        double const expect = (h & 0x8000 ? -1.0 : 1.0) * (e ? std::ldexp(1.0 + m / 1024.0, e - 15) : std::ldexp(m, -24));
        if (static_cast<double>(f) != expect || half(f) != h) ++bad;  // -0.0 keeps its sign
    }
    CHECK(bad == 0);
    // buffers: FP32 copies bit for bit, FP16 halves the bytes
    std::vector<float> x = {0.25f, -3.5f, 1e-3f, 1000.0f};
    std::vector<uint8_t> buf(x.size() * 4);
    cvig::packFloats(x.data(), x.size(), cvig::IoType::kFloat32, buf.data());
    CHECK(std::memcmp(buf.data(), x.data(), buf.size()) == 0);
    std::vector<float> y(x.size());
    cvig::packFloats(x.data(), x.size(), cvig::IoType::kFloat16, buf.data());
    cvig::unpackFloats(buf.data(), x.size(), cvig::IoType::kFloat16, y.data());
    for (size_t i = 0; i < x.size(); ++i) CHECK(std::fabs(y[i] - x[i]) <= std::fabs(x[i]) * std::ldexp(1.0f, -11));
    if (failures) std::cerr << failures << " check(s) failed\n";
    return failures ? 1 : 0;
}
