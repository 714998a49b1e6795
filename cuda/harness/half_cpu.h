// __half and __nv_bfloat16 for the CPU harness: storage types holding the raw 16 bits, with the
// device's conversions (round to nearest, ties to even; NaN becomes the canonical NaN 0x7fff,
// as cuda_fp16.h / cuda_bf16.h produce). Arithmetic on these types is not provided: kernels
// convert to float, accumulate in float and convert back.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t __x;
};
struct __nv_bfloat16 {
    uint16_t __x;
};

namespace lc_harness {
inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Rounds `value >> shift` to nearest, ties to even (shift >= 1).
inline uint32_t shift_round_even(uint32_t value, int shift) {
    const uint32_t kept = value >> shift;
    const uint32_t rest = value & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    return kept + ((rest > halfway || (rest == halfway && (kept & 1))) ? 1 : 0);
}

inline uint16_t f32_to_f16_bits(float f) {
    const uint32_t x = float_bits(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000);
    const uint32_t magnitude = x & 0x7fffffff;
    if (magnitude > 0x7f800000) return 0x7fff;                    // NaN
    if (magnitude >= 0x477ff000) return uint16_t(sign | 0x7c00);  // >= 65520 rounds to infinity
    const int exponent = int(magnitude >> 23);                    // biased f32 exponent
    if (magnitude < 0x38800000) {                                 // below 2^-14: f16 subnormal or 0
        // value = mantissa * 2^(exponent - 150); f16 subnormal unit is 2^-24.
        const int shift = 126 - exponent;
        if (shift > 24) return sign;  // below half the smallest subnormal (or a tie to 0)
        const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000;
        return uint16_t(sign | shift_round_even(mantissa, shift));
    }
    // Normal: rebias the exponent (127 -> 15) and round 23 mantissa bits to 10; a carry out of
    // the mantissa correctly bumps the exponent.
    const uint32_t rebased = (uint32_t(exponent - 112) << 23) | (magnitude & 0x7fffff);
    return uint16_t(sign | shift_round_even(rebased, 13));
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000 | (mantissa << 13));  // inf / NaN
    if (exponent == 0) {
        if (mantissa == 0) return bits_float(sign);
        // subnormal: mantissa * 2^-24, exact in f32
        const float value = float(mantissa) * 0x1p-24f;
        return sign ? -value : value;
    }
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) return 0x7fff;  // NaN
    // Round the low 16 bits away, ties to even; overflow rounds to infinity naturally.
    return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return bits_float(uint32_t(b) << 16); }
}  // namespace lc_harness

inline __half __float2half(float f) { return __half{::lc_harness::f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return ::lc_harness::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{::lc_harness::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::lc_harness::bf16_bits_to_f32(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
