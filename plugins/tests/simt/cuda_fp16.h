// CUDA's half-precision conversions for the SIMT test executor, through the compiler's own binary16
// type (_Float16 on x86-64 and AArch64): an implementation independent of the host build's bit
// manipulation in cvig_hd.h, so comparing the two builds also checks the conversions.
#ifndef CVIG_SIMT_CUDA_FP16_H
#define CVIG_SIMT_CUDA_FP16_H

#include <stdint.h>
#include <string.h>

struct __half {
    _Float16 v;
};

inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) {  // round to nearest even; a NaN becomes 0x7fff, as on the GPU
    if (f != f) {
        const unsigned short nan = 0x7fff;
        __half h;
        memcpy(&h, &nan, sizeof h);
        return h;
    }
    return __half{static_cast<_Float16>(f)};
}
inline __half __ushort_as_half(unsigned short bits) {
    __half h;
    memcpy(&h, &bits, sizeof h);
    return h;
}
inline unsigned short __half_as_ushort(__half h) {
    unsigned short bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

#endif  // CVIG_SIMT_CUDA_FP16_H
