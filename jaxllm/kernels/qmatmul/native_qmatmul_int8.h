// The integer path (attribute int8_activations).
#pragma once

#include "native_qmatmul_common.h"
#include "native_qmatmul_threads.h"

namespace {

constexpr int64_t kQBlock = 32;         // x values per int8 block, which has one float scale
constexpr int64_t kPair = 2 * kQBlock;  // x values per 512-bit integer dot product

// x quantized row by row into int8 blocks of 32 (Q8_0), zero-padded to whole pairs of blocks.
struct QuantX {
  int64_t blocks, pairs, stride;   // per row; stride = pairs * kPair
  std::vector<int8_t> q;           // [M, stride] (ArrangeForVnni reorders each pair)
  std::vector<float> d;            // [M, 2 * pairs] block scales: 0 for padding, NaN where x is not finite
  std::vector<float> gsum;         // [M, groups]: sum over the group's blocks of d * (sum of the block's q)
  std::vector<float> lane_d;       // VNNI: [M, pairs, 16] the block scale of each int32 lane
  std::vector<int32_t> lane_corr;  // VNNI, int8 weights: [M, pairs, 16] -128 * the sum of the lane's 4 q
};

// Symmetric round to nearest: d = absmax / 127, q = round(x * 127 / absmax), so |x - d q| <= absmax / 254.
QuantX QuantizeX(const Problem& p) {
  QuantX x;
  x.blocks = (p.k + kQBlock - 1) / kQBlock;
  x.pairs = (x.blocks + 1) / 2;
  x.stride = x.pairs * kPair;
  const int64_t nb = 2 * x.pairs;
  x.q.assign(p.m * x.stride, 0);
  x.d.assign(p.m * nb, 0.f);
  x.gsum.assign(p.m * p.groups, 0.f);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t b = 0; b < x.blocks; ++b) {
      const float* src = p.x + i * p.k + b * kQBlock;
      int8_t* dst = x.q.data() + i * x.stride + b * kQBlock;
      const int64_t len = std::min(kQBlock, p.k - b * kQBlock);
      float amax = 0.f;
      bool finite = true;
      for (int64_t j = 0; j < len; ++j) {
        const float a = std::fabs(src[j]);
        amax = a > amax ? a : amax;
        finite &= a <= std::numeric_limits<float>::max();
      }
      float& d = x.d[i * nb + b];
      int32_t sum = 0;
      if (!finite) {  // NaN or infinity in x: NaN in every output of the row (the float math: NaN or inf)
        d = std::numeric_limits<float>::quiet_NaN();
      } else if (amax > 0.f) {
        const float id = 127.f / amax;
        for (int64_t j = 0; j < len; ++j) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(src[j] * id));
          dst[j] = static_cast<int8_t>(v);
          sum += v;
        }
        d = amax / 127.f;
      }
      x.gsum[i * p.groups + b * kQBlock / p.group] += d * static_cast<float>(sum);
    }
  }
  return x;
}

// Blocks [first, last) of weight group g.
inline void GroupBlocks(const Problem& p, const QuantX& x, int64_t g, int64_t& first, int64_t& last) {
  first = g * p.group / kQBlock;
  last = g == p.groups - 1 ? x.blocks : (g + 1) * p.group / kQBlock;
}

#if JAXLLM_VNNI

// Reorders each pair of x's blocks to match the weights' bytes in a 512-bit register, and spreads the
// block scales (and, for int8 weights, the -128 * sum correction) over its int32 lanes. uint4: a pair's
// 32 weight bytes unpack to [low nibbles of block 0, of block 1, high nibbles of 0, of 1], that is
// elements [even of block 0, even of 1, odd of 0, odd of 1]; lanes 0-3 and 8-11 belong to block 0.
// int8: natural order, lanes 0-7 to block 0.
void ArrangeForVnni(QuantX& x, int64_t m, bool uint4) {
  const int64_t nb = 2 * x.pairs;
  x.lane_d.resize(m * x.pairs * 16);
  if (!uint4) x.lane_corr.resize(m * x.pairs * 16);
  int8_t tmp[kPair];
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < x.pairs; ++c) {
      int8_t* q = x.q.data() + i * x.stride + c * kPair;
      if (uint4) {
        for (int64_t h = 0; h < 2; ++h) {
          for (int64_t e = 0; e < 16; ++e) {
            tmp[h * 16 + e] = q[h * kQBlock + 2 * e];
            tmp[kQBlock + h * 16 + e] = q[h * kQBlock + 2 * e + 1];
          }
        }
        std::copy(tmp, tmp + kPair, q);
      }
      const int64_t lanes = (i * x.pairs + c) * 16;
      for (int64_t l = 0; l < 16; ++l) {
        x.lane_d[lanes + l] = x.d[i * nb + 2 * c + (uint4 ? (l / 4) % 2 : l / 8)];
        if (!uint4) x.lane_corr[lanes + l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      }
    }
  }
}

// How a pair of blocks finds its two weight scales: one group holds both, a group per block (group 32),
// or anything else (and the last pair, which may be partly padding).
enum Scales { kScaleUniform, kScalePerBlock, kScaleAny };

// The weight scale of each int32 lane of pair c of a row (scale: the row's [groups]).
template <bool kUint4W, int kScales>
inline __m512 PairScales(const Problem& p, const float* scale, int64_t c) {
  constexpr __mmask16 kSecond = kUint4W ? 0xF0F0 : 0xFF00;  // the lanes of the pair's second block
  if constexpr (kScales == kScaleUniform) {
    return _mm512_set1_ps(scale[c * kPair / p.group]);
  } else if constexpr (kScales == kScalePerBlock) {
    const __m512i idx = _mm512_maskz_mov_epi32(kSecond, _mm512_set1_epi32(1));
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scale + 2 * c)));
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two));
  } else {
    const int64_t g0 = std::min(2 * c * kQBlock / p.group, p.groups - 1);
    const int64_t g1 = std::min((2 * c + 1) * kQBlock / p.group, p.groups - 1);
    return _mm512_mask_blend_ps(kSecond, _mm512_set1_ps(scale[g0]), _mm512_set1_ps(scale[g1]));
  }
}

// Weight rows n0 .. n0 + 4 (clamped to the last row; extra columns are not stored) against kM rows of x
// from m0. Per pair of blocks: the 4 rows' 64 weights are unpacked once into bytes (uint4: 0..15; int8:
// w + 128, unsigned, the -128 * sum x correction preloaded into the accumulator), one vpdpbusd per row of
// x gives 16 exact int32 partial sums, converted and scaled by d_x * d_w into float accumulators.
template <bool kUint4W, bool kOffset, int kM, int kScales>
void VnniTile(const Problem& p, const QuantX& x, int64_t m0, int64_t n0) {
  constexpr int64_t kPairBytes = kUint4W ? kPair / 2 : kPair;
  const uint8_t* q[kRows];
  const float *scale[kRows], *offset[kRows];
  _Pragma("GCC unroll 8")
  for (int j = 0; j < kRows; ++j) {
    const int64_t n = std::min(n0 + j, p.n - 1);
    q[j] = p.q + n * p.row_bytes;
    scale[j] = p.scale + n * p.groups;
    offset[j] = kOffset ? p.offset + n * p.groups : nullptr;
  }
  __m512 acc[kM][kRows];
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i)
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_setzero_ps();
  const int8_t* xq = x.q.data() + m0 * x.stride;
  const float* xd = x.lane_d.data() + m0 * x.pairs * 16;
  const int32_t* xc = kUint4W ? nullptr : x.lane_corr.data() + m0 * x.pairs * 16;
  const int64_t ahead = 2 * kRows * p.row_bytes;
  auto step = [&](int64_t c, auto tail) __attribute__((always_inline)) {
    constexpr bool kTail = decltype(tail)::value;  // the last pair, past the end of the row in part
    const int64_t valid = p.row_bytes - c * kPairBytes;
    __m512i w[kRows];
    __m512 dw[kRows];
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) {
      const uint8_t* src = q[j] + c * kPairBytes;
      if constexpr (kUint4W) {
        const __m256i y = kTail ? _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << valid) - 1), src)
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(y), _mm256_srli_epi16(y, 4), 1);
        w[j] = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
      } else {
        const __m512i z = kTail ? _mm512_maskz_loadu_epi8(static_cast<__mmask64>((1ull << valid) - 1), src)
                                : _mm512_loadu_si512(src);
        w[j] = _mm512_xor_si512(z, _mm512_set1_epi8(static_cast<char>(0x80)));
      }
      dw[j] = PairScales<kUint4W, kTail ? kScaleAny : kScales>(p, scale[j], c);
      if constexpr (!kTail) _mm_prefetch(reinterpret_cast<const char*>(src + ahead), _MM_HINT_T0);
    }
    _Pragma("GCC unroll 8")
    for (int i = 0; i < kM; ++i) {
      const __m512i xv = _mm512_loadu_si512(xq + i * x.stride + c * kPair);
      const __m512 dx = _mm512_loadu_ps(xd + (i * x.pairs + c) * 16);
      const __m512i init = kUint4W ? _mm512_setzero_si512() : _mm512_loadu_si512(xc + (i * x.pairs + c) * 16);
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) {
        const __m512i isum = _mm512_dpbusd_epi32(init, w[j], xv);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dx, dw[j]), acc[i][j]);
      }
    }
  };
  const int64_t full = std::min(x.pairs, p.row_bytes / kPairBytes);
  for (int64_t c = 0; c < full; ++c) step(c, std::false_type{});
  if (full < x.pairs) step(full, std::true_type{});
  if constexpr (kOffset) {  // acc += offset[g] * gsum[g], 16 groups at a time
    for (int64_t g = 0; g < p.groups; g += 16) {
      const __mmask16 mask = p.groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (p.groups - g)) - 1);
      __m512 o[kRows];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) o[j] = _mm512_maskz_loadu_ps(mask, offset[j] + g);
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i) {
        const __m512 gs = _mm512_maskz_loadu_ps(mask, x.gsum.data() + (m0 + i) * p.groups + g);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_fmadd_ps(o[j], gs, acc[i][j]);
      }
    }
  }
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i) Store4(p, m0 + i, n0, Hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <bool kUint4W, bool kOffset, int kScales>
void VnniTileRows(const Problem& p, const QuantX& x, int64_t m0, int64_t n0, int64_t rows) {
  switch (rows) {
    case 4: VnniTile<kUint4W, kOffset, 4, kScales>(p, x, m0, n0); break;
    case 3: VnniTile<kUint4W, kOffset, 3, kScales>(p, x, m0, n0); break;
    case 2: VnniTile<kUint4W, kOffset, 2, kScales>(p, x, m0, n0); break;
    default: VnniTile<kUint4W, kOffset, 1, kScales>(p, x, m0, n0); break;
  }
}

#else  // JAXLLM_VNNI

// Portable path: each weight row's values decoded once into int8 (scratch: K rounded up to blocks), then
// dotted block by block in integers with every row of x.
template <bool kUint4W, bool kOffset>
void IntScalarTask(const Problem& p, const QuantX& x, int64_t n0, int64_t n1, int8_t* row) {
  const int64_t nb = 2 * x.pairs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = p.q + n * p.row_bytes;
    for (int64_t k = 0; k < p.k; ++k) {
      row[k] = kUint4W ? static_cast<int8_t>((src[k >> 1] >> ((k & 1) * 4)) & 0xF) : static_cast<int8_t>(src[k]);
    }
    std::fill(row + p.k, row + x.blocks * kQBlock, 0);
    const float* scale = p.scale + n * p.groups;
    for (int64_t i = 0; i < p.m; ++i) {
      const int8_t* xq = x.q.data() + i * x.stride;
      float acc = 0.f;
      for (int64_t g = 0; g < p.groups; ++g) {
        int64_t first, last;
        GroupBlocks(p, x, g, first, last);
        float gacc = 0.f;
        for (int64_t b = first; b < last; ++b) {
          int32_t s = 0;
          for (int64_t j = b * kQBlock; j < (b + 1) * kQBlock; ++j) s += int32_t{row[j]} * int32_t{xq[j]};
          gacc += x.d[i * nb + b] * static_cast<float>(s);
        }
        acc += scale[g] * gacc;
        if constexpr (kOffset) acc += p.offset[n * p.groups + g] * x.gsum[i * p.groups + g];
      }
      p.out[i * p.n + n] = acc;
    }
  }
}

#endif  // JAXLLM_VNNI

template <bool kUint4W, bool kOffset>
void RunInt(ffi::ThreadPool& pool, const Problem& p) {
  QuantX x = QuantizeX(p);  // outlives every task: ParallelFor waits for all of them
  const int64_t tasks = (p.n + kTaskRows - 1) / kTaskRows;
#if JAXLLM_VNNI
  ArrangeForVnni(x, p.m, kUint4W);
  const int scales = p.group % kPair == 0 || p.groups == 1 ? kScaleUniform
                     : p.group == kQBlock                   ? kScalePerBlock
                                                            : kScaleAny;
  ParallelFor(pool, p.m, tasks, 0, [&p, &x, scales](int64_t t, float*) {
    const int64_t n1 = std::min(p.n, (t + 1) * kTaskRows);
    for (int64_t n0 = t * kTaskRows; n0 < n1; n0 += kRows) {
      for (int64_t m0 = 0; m0 < p.m; m0 += kBatchRows) {
        const int64_t rows = std::min(kBatchRows, p.m - m0);
        switch (scales) {
          case kScaleUniform: VnniTileRows<kUint4W, kOffset, kScaleUniform>(p, x, m0, n0, rows); break;
          case kScalePerBlock: VnniTileRows<kUint4W, kOffset, kScalePerBlock>(p, x, m0, n0, rows); break;
          default: VnniTileRows<kUint4W, kOffset, kScaleAny>(p, x, m0, n0, rows); break;
        }
      }
    }
  });
#else
  ParallelFor(pool, p.m, tasks, x.blocks * kQBlock / 4, [&p, &x](int64_t t, float* scratch) {
    IntScalarTask<kUint4W, kOffset>(p, x, t * kTaskRows, std::min(p.n, (t + 1) * kTaskRows),
                                    reinterpret_cast<int8_t*>(scratch));
  });
#endif
}
}  // namespace
