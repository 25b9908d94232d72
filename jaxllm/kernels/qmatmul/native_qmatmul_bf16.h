// The bf16-dot path (attribute bf16_dot): x and each 32 decoded weights rounded to bfloat16, multiplied
// in pairs by AVX-512 BF16 (vdpbf16ps: 32 products into 16 float32 lanes per instruction, twice the
// float FMA's), summed in float32. For row counts where the float path is bound by its FMAs.
#pragma once

#include "native_qmatmul_common.h"
#include "native_qmatmul_float.h"
#include "native_qmatmul_threads.h"

namespace {

#if JAXLLM_AVX512 && defined(__AVX512BF16__)
#define JAXLLM_BF16 1

constexpr int64_t kBf16Block = 32;  // values per bf16 vector
constexpr int64_t kBf16BatchRows = 6;  // rows of x per register tile: 24 accumulators, 4 weight vectors

// Whether the bf16 path takes this problem: whole 32-blocks of K, each in one group.
bool Bf16Takes(const Problem& p) { return p.k % kBf16Block == 0 && (p.group % kBf16Block == 0 || p.group == p.k); }

// x [M, K] (already paired where the kind reads pairs) as bf16 vectors [M, K / 32], each 32-block in the
// order its two halves are loaded by the float path (x0 lanes, then x1 lanes), as the weights are packed.
std::vector<__m512bh> XToBf16(const Problem& p) {
  const int64_t blocks = p.k / kBf16Block;
  std::vector<__m512bh> out(p.m * blocks);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = p.x + i * p.k + b * kBf16Block;
      out[i * blocks + b] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + kBlock), _mm512_loadu_ps(src));
    }
  }
  return out;
}

// As FusedTile, but each 32 dequantized weights of a row become one bf16 vector, dotted with every row of
// x by one vdpbf16ps.
template <Kind kKind, bool kOffset, int kM, int kGroup>
void Bf16Tile(const Problem& p, const __m512bh* xb, int64_t n0) {
  auto rows = TileReaders<kKind, kOffset>(p, n0);
  __m512 acc[kM][kRows];
  ZeroTile<kM>(acc);
  const int64_t group = kGroup ? kGroup : p.group;
  const int64_t blocks = p.k / kBf16Block;
  const int64_t ahead = 2 * kRows * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) rows[j].SetGroup(g);
    for (int64_t k = g * group; k < (g + 1) * group; k += kBf16Block) {
      __m512bh w[kRows];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) {
        __m512 w0, w1;
        rows[j].Weights32(k, w0, w1);
        w[j] = _mm512_cvtne2ps_pbh(w1, w0);
        _mm_prefetch(reinterpret_cast<const char*>(rows[j].q + ahead + ByteAt(kKind, k)), _MM_HINT_T0);
      }
      const int64_t b = k / kBf16Block;
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i) {
        const __m512bh xv = xb[i * blocks + b];
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[j], xv);
      }
    }
  }
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i) Store4(p, i, n0, Hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <Kind kKind, bool kOffset, int kGroup>
void Bf16Rows(const Problem& p, const __m512bh* xb, int64_t n0, int64_t rows) {
  switch (rows) {
    case 6: Bf16Tile<kKind, kOffset, 6, kGroup>(p, xb, n0); break;
    case 5: Bf16Tile<kKind, kOffset, 5, kGroup>(p, xb, n0); break;
    case 4: Bf16Tile<kKind, kOffset, 4, kGroup>(p, xb, n0); break;
    case 3: Bf16Tile<kKind, kOffset, 3, kGroup>(p, xb, n0); break;
    case 2: Bf16Tile<kKind, kOffset, 2, kGroup>(p, xb, n0); break;
    default: Bf16Tile<kKind, kOffset, 1, kGroup>(p, xb, n0); break;
  }
}

template <Kind kKind, bool kOffset>
void RunBf16(ffi::ThreadPool& pool, const Problem& p_in) {
  Problem p = p_in;
  std::vector<float> paired;
  if constexpr (kKind == kUint4Paired) {
    paired = PairX(p);
    p.x = paired.data();
  }
  const std::vector<__m512bh> xb = XToBf16(p);
  const int64_t blocks = p.k / kBf16Block;
  const int64_t tasks = (p.n + kTaskRows - 1) / kTaskRows;
  ParallelFor(pool, p.m, tasks, 0, [&p, &xb, blocks](int64_t t, float*) {
    const int64_t n1 = std::min(p.n, (t + 1) * kTaskRows);
    for (int64_t n0 = t * kTaskRows; n0 < n1; n0 += kRows) {
      for (int64_t m0 = 0; m0 < p.m; m0 += kBf16BatchRows) {
        Problem tile = p;
        tile.out += m0 * p.n;
        const __m512bh* x = xb.data() + m0 * blocks;
        const int64_t rows = std::min(kBf16BatchRows, p.m - m0);
        switch (kKind == kUint4 ? 0 : p.group) {
          case 32: Bf16Rows<kKind, kOffset, 32>(tile, x, n0, rows); break;
          case 64: Bf16Rows<kKind, kOffset, 64>(tile, x, n0, rows); break;
          default: Bf16Rows<kKind, kOffset, 0>(tile, x, n0, rows); break;
        }
      }
    }
  });
}

#else
#define JAXLLM_BF16 0
#endif

}  // namespace
