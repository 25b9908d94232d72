// Shared by the quantized matmul's float and integer paths: the problem, the weight kinds, scalar
// decoding, and the AVX-512 horizontal sum and store of a register tile.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

// The vector path needs AVX-512 F, BW and VL (and F16C, which every AVX-512 CPU has); elsewhere the
// portable path (built with -march=native, left to the compiler to vectorise) runs.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define JAXLLM_AVX512 1
#include <immintrin.h>
#else
#define JAXLLM_AVX512 0
#endif
// The integer path's vector loop also needs VNNI; without it a portable loop gives the same sums.
#if JAXLLM_AVX512 && defined(__AVX512VNNI__)
#define JAXLLM_VNNI 1
#else
#define JAXLLM_VNNI 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace {

// kUint4Paired: uint4 whose 32-value blocks are read as (even, odd) halves against an x permuted to
// match (see PairX), which saves the nibble interleave; for groups that are multiples of 32, or K.
// kF16, kBf16: 16-bit floats (a GGUF F16 / BF16 tensor kept as stored), two bytes per value.
enum Kind { kInt8, kUint4, kFp8, kUint4Paired, kF16, kBf16 };

constexpr bool IsUint4(int kind) { return kind == kUint4 || kind == kUint4Paired; }
constexpr bool IsHalf(int kind) { return kind == kF16 || kind == kBf16; }
// The byte offset of value k in a weight row.
constexpr int64_t ByteAt(int kind, int64_t k) { return IsUint4(kind) ? k / 2 : (IsHalf(kind) ? 2 * k : k); }

constexpr int64_t kBlock = 16;     // weights per vector
constexpr int64_t kRows = 4;       // weight rows per register tile
constexpr int64_t kBatchRows = 4;  // rows of x per register tile
constexpr int64_t kTaskRows = 16;  // weight rows per task

struct Problem {
  int64_t m, n, k, group, groups, row_bytes;
  const float* x;       // [M, K]
  const uint8_t* q;     // this layer's [N, row_bytes]
  const float* scale;   // this layer's [N, groups]
  const float* offset;  // this layer's [N, groups], or null
  float* out;           // [M, N]
};

float Fp8ToFloat(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  float v;
  if (e == 15 && m == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);
  } else {
    v = std::ldexp(1.f + m / 8.f, e - 7);
  }
  return (b & 0x80) ? -v : v;
}

// IEEE binary16 -> float, exactly (subnormals, infinities and NaN included), without F16C.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float v;
  if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 31) {
    v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(m | 0x400), static_cast<int>(e) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline uint16_t Load16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

template <Kind kKind>
inline float Value(const uint8_t* row, int64_t k) {
  if constexpr (kKind == kInt8) return static_cast<float>(static_cast<int8_t>(row[k]));
  if constexpr (IsUint4(kKind)) return static_cast<float>((row[k >> 1] >> ((k & 1) * 4)) & 0xF);
  if constexpr (kKind == kFp8) return Fp8ToFloat(row[k]);
  if constexpr (kKind == kF16) return HalfToFloat(Load16(row + 2 * k));
  if constexpr (kKind == kBf16) return Bf16ToFloat(Load16(row + 2 * k));
}

// Row n's dequantized weights [k0, k0 + len) into dst, then zeros up to `padded`.
template <Kind kKind, bool kOffset>
void DecodeScalar(const Problem& p, int64_t n, int64_t k0, int64_t len, int64_t padded, float* dst) {
  const uint8_t* row = p.q + n * p.row_bytes;
  const float* s = p.scale + n * p.groups;
  const float* o = kOffset ? p.offset + n * p.groups : nullptr;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t k = k0 + i, g = k / p.group;
    const float w = s[g] * Value<kKind>(row, k);
    dst[i] = kOffset ? w + o[g] : w;
  }
  std::fill(dst + len, dst + padded, 0.f);
}

#if JAXLLM_AVX512

// Keeps v in a register: the compiler would otherwise fold a reused load into every FMA that reads it,
// and the loads, not the FMAs, would bound the loop.
#define JAXLLM_IN_REGISTER(v) asm("" : "+v"(v))
// [sum a, sum b, sum c, sum d].
inline __m128 Hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(r),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// out[m, n0 .. n0 + 4) for the valid columns.
inline void Store4(const Problem& p, int64_t m, int64_t n0, __m128 v) {
  const int64_t valid = std::min<int64_t>(kRows, p.n - n0);
  _mm_mask_storeu_ps(p.out + m * p.n + n0, static_cast<__mmask8>((1u << valid) - 1), v);
}

#endif  // JAXLLM_AVX512

}  // namespace
