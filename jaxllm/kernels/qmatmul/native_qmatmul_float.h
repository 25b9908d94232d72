// The float path: weights decoded into registers and dequantized in exact float math.
#pragma once

#include <array>

#include "native_qmatmul_common.h"
#include "native_qmatmul_threads.h"

namespace {

#if JAXLLM_AVX512

// fp8 e4m3fn -> fp16 is a shift (sign, exponent and mantissa land in place, subnormals stay subnormal,
// the exponent bias is off by 8), then F16C converts exactly: values come out times 2^-8, which
// ScaleFactor puts back into the scale (a power of two: exact). NaN (S.1111.111) is patched in.
inline __m512 Fp8x16Scaled(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-16385));
  __m512 v = _mm512_cvtph_ps(h);
  const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
  if (__builtin_expect(nan != 0, 0)) {
    v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  }
  return v;
}

template <Kind kKind>
constexpr float ScaleFactor() {
  return kKind == kFp8 ? 256.f : 1.f;
}

// The 16 stored values of `row` from k (even) as floats, divided by ScaleFactor.
template <Kind kKind>
inline __m512 Values16(const uint8_t* row, int64_t k) {
  if constexpr (kKind == kInt8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  if constexpr (IsUint4(kKind)) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  }
  if constexpr (kKind == kFp8) return Fp8x16Scaled(row + k);
  if constexpr (kKind == kF16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  if constexpr (kKind == kBf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// The 32 stored values from k (even); for uint4 one 16-byte load serves both halves.
template <Kind kKind>
inline void Values32(const uint8_t* row, int64_t k, __m512& v0, __m512& v1) {
  if constexpr (kKind == kUint4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
  } else {  // (kUint4Paired reads through its table in RowReader::Weights32)
    v0 = Values16<kKind>(row, k);
    v1 = Values16<kKind>(row, k + kBlock);
  }
}

// One weight row: its pointers, and the current group's scale and offset as vectors.
template <Kind kKind, bool kOffset>
struct RowReader {
  const uint8_t* q;
  const float *scale, *offset;
  __m512 s, o;
  // uint4 (paired): the group's 16 dequantized values scale * v + offset (v = 0..15), each one FMA as in
  // Dequant, so that vpermps looks a weight up by its nibble (it reads only an index's low 4 bits): no
  // mask, no int-to-float conversion and no dequantizing FMA per weight. Same values, bit for bit.
  __m512 table;

  RowReader(const Problem& p, int64_t n)
      : q(p.q + n * p.row_bytes), scale(p.scale + n * p.groups), offset(kOffset ? p.offset + n * p.groups : nullptr) {}
  void SetGroup(int64_t g) {
    s = _mm512_set1_ps(scale[g] * ScaleFactor<kKind>());
    if constexpr (kOffset) o = _mm512_set1_ps(offset[g]);
    if constexpr (kKind == kUint4Paired) {
      table = Dequant(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    }
  }
  __m512 Dequant(__m512 v) const {
    if constexpr (kOffset) return _mm512_fmadd_ps(v, s, o);
    return _mm512_mul_ps(v, s);
  }
  __m512 Weights16(int64_t k) const { return Dequant(Values16<kKind>(q, k)); }
  void Weights32(int64_t k, __m512& w0, __m512& w1) const {
    if constexpr (kKind == kUint4Paired) {  // elements k, k + 2, ..., then k + 1, k + 3, ...
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      w0 = _mm512_permutexvar_ps(b, table);
      w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
      return;
    }
    Values32<kKind>(q, k, w0, w1);
    w0 = Dequant(w0);
    w1 = Dequant(w1);
  }
};

// The readers of weight rows n0 .. n0 + 4, clamped to the last row (its extra columns are not stored).
template <Kind kKind, bool kOffset>
inline std::array<RowReader<kKind, kOffset>, kRows> TileReaders(const Problem& p, int64_t n0) {
  using Reader = RowReader<kKind, kOffset>;
  return {Reader(p, std::min(n0, p.n - 1)), Reader(p, std::min(n0 + 1, p.n - 1)),
          Reader(p, std::min(n0 + 2, p.n - 1)), Reader(p, std::min(n0 + 3, p.n - 1))};
}

template <int kM>
inline void ZeroTile(__m512 (&acc)[kM][kRows]) {
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i)
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_setzero_ps();
}

// Weight rows n0 .. n0 + 4 (clamped to the last row; extra columns are not stored) against kM rows of x.
// Every 32 weights are decoded into registers once and used by every row of x. kGroup: the group size
// when known at compile time (the per-group loop then unrolls away), else 0.
template <Kind kKind, bool kOffset, int kM, int kGroup>
void FusedTile(const Problem& p, int64_t n0) {
  auto rows = TileReaders<kKind, kOffset>(p, n0);
  __m512 acc[kM][kRows];
  ZeroTile<kM>(acc);
  const int64_t group = kGroup ? kGroup : p.group;
  const int64_t full = group - group % kBlock;  // the tail is nonzero only when group == K
  const int64_t pairs = full - full % (2 * kBlock);
  const int64_t ahead = 2 * kRows * p.row_bytes;
  // int8 against one row of x: the factored loop below, which streams fastest prefetching further ahead, into L2.
  constexpr bool kFactored = kKind == kInt8 && kM == 1;
  const int64_t ahead_l2 = 8 * kRows * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) rows[j].SetGroup(g);
    const int64_t base = g * group;
    if constexpr (kFactored) {
      // a = sum over the group of v * x (convert + FMA only), then
      // acc += scale * a (+ offset * sum of x, kept lane-wise and summed with acc at the end).
      __m512 a[kM][kRows], xs[kM];
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i) {
        xs[i] = _mm512_setzero_ps();
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) a[i][j] = _mm512_setzero_ps();
      }
      for (int64_t k = base; k < base + pairs; k += 2 * kBlock) {
        __m512 v0[kRows], v1[kRows];
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) {
          Values32<kKind>(rows[j].q, k, v0[j], v1[j]);
          _mm_prefetch(reinterpret_cast<const char*>(rows[j].q + ahead_l2 + k), _MM_HINT_T1);
        }
        _Pragma("GCC unroll 8")
        for (int i = 0; i < kM; ++i) {
          __m512 x0 = _mm512_loadu_ps(p.x + i * p.k + k), x1 = _mm512_loadu_ps(p.x + i * p.k + k + kBlock);
          JAXLLM_IN_REGISTER(x0);
          JAXLLM_IN_REGISTER(x1);
          if constexpr (kOffset) xs[i] = _mm512_add_ps(xs[i], _mm512_add_ps(x0, x1));
          _Pragma("GCC unroll 8")
          for (int j = 0; j < kRows; ++j) a[i][j] = _mm512_fmadd_ps(x1, v1[j], _mm512_fmadd_ps(x0, v0[j], a[i][j]));
        }
      }
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i)
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) {
          acc[i][j] = _mm512_fmadd_ps(rows[j].s, a[i][j], acc[i][j]);
          if constexpr (kOffset) acc[i][j] = _mm512_fmadd_ps(rows[j].o, xs[i], acc[i][j]);
        }
    } else
    for (int64_t k = base; k < base + pairs; k += 2 * kBlock) {
      __m512 w0[kRows], w1[kRows];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) {
        rows[j].Weights32(k, w0[j], w1[j]);
        // One core streams too few lines at once to reach memory bandwidth: ask for a later tile's (at one
        // row of x, further ahead into L2, as the int8 loop above).
        const int64_t at = (kM == 1 ? ahead_l2 : ahead) + ByteAt(kKind, k);
        _mm_prefetch(reinterpret_cast<const char*>(rows[j].q + at), kM == 1 ? _MM_HINT_T1 : _MM_HINT_T0);
      }
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i) {
        __m512 x0 = _mm512_loadu_ps(p.x + i * p.k + k), x1 = _mm512_loadu_ps(p.x + i * p.k + k + kBlock);
        JAXLLM_IN_REGISTER(x0);
        JAXLLM_IN_REGISTER(x1);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_fmadd_ps(x1, w1[j], _mm512_fmadd_ps(x0, w0[j], acc[i][j]));
      }
    }
    for (int64_t k = base + pairs; k < base + group; k += kBlock) {  // a last 16, or the partial tail
      const int64_t len = std::min(kBlock, base + group - k);
      const __mmask16 mask = static_cast<__mmask16>((1u << len) - 1);
      __m512 w[kRows];
      alignas(64) float tail[kRows][kBlock];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) {
        if (len == kBlock) {
          w[j] = rows[j].Weights16(k);
        } else {
          DecodeScalar<kKind, kOffset>(p, std::min(n0 + j, p.n - 1), k, len, kBlock, tail[j]);
          w[j] = _mm512_load_ps(tail[j]);
        }
      }
      _Pragma("GCC unroll 8")
      for (int i = 0; i < kM; ++i) {
        __m512 xv = _mm512_maskz_loadu_ps(mask, p.x + i * p.k + k);
        _Pragma("GCC unroll 8")
        for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
      }
    }
  }
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i) Store4(p, i, n0, Hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <Kind kKind, bool kOffset, int kGroup>
void TileRows(const Problem& p, int64_t n0, int64_t rows) {
  switch (rows) {
    case 4: FusedTile<kKind, kOffset, 4, kGroup>(p, n0); break;
    case 3: FusedTile<kKind, kOffset, 3, kGroup>(p, n0); break;
    case 2: FusedTile<kKind, kOffset, 2, kGroup>(p, n0); break;
    default: FusedTile<kKind, kOffset, 1, kGroup>(p, n0); break;
  }
}

#endif  // JAXLLM_AVX512
// Portable path: each weight row decoded once into a buffer, then dotted with every row of x.
template <Kind kKind, bool kOffset>
void ScalarTask(const Problem& p, int64_t n0, int64_t n1, float* row) {
  for (int64_t n = n0; n < n1; ++n) {
    DecodeScalar<kKind, kOffset>(p, n, 0, p.k, p.k, row);
    for (int64_t i = 0; i < p.m; ++i) {
      const float* x = p.x + i * p.k;
      float acc = 0.f;
      for (int64_t k = 0; k < p.k; ++k) acc += x[k] * row[k];
      p.out[i * p.n + n] = acc;
    }
  }
}

// x with each whole 32-block of a row reordered as its even elements, then its odd ones (kUint4Paired).
std::vector<float> PairX(const Problem& p) {
  std::vector<float> out(p.x, p.x + p.m * p.k);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t b = 0; b + 2 * kBlock <= p.k; b += 2 * kBlock) {
      const float* src = p.x + i * p.k + b;
      float* dst = out.data() + i * p.k + b;
      for (int64_t e = 0; e < kBlock; ++e) dst[e] = src[2 * e], dst[kBlock + e] = src[2 * e + 1];
    }
  }
  return out;
}

template <Kind kKind, bool kOffset>
void Run(ffi::ThreadPool& pool, const Problem& p_in) {
  Problem p = p_in;
  const int64_t tasks = (p.n + kTaskRows - 1) / kTaskRows;
#if JAXLLM_AVX512
  std::vector<float> paired;  // outlives every task: Run waits for all of them
  if constexpr (kKind == kUint4Paired) {
    paired = PairX(p);
    p.x = paired.data();
  }
  ParallelFor(pool, p.m, tasks, 0, [&p](int64_t t, float*) {
    const int64_t n1 = std::min(p.n, (t + 1) * kTaskRows);
    for (int64_t n0 = t * kTaskRows; n0 < n1; n0 += kRows) {
      // The 4 rows' bytes stay in L1 while every 4 rows of x take their turn.
      for (int64_t m0 = 0; m0 < p.m; m0 += kBatchRows) {
        Problem tile = p;
        tile.x += m0 * p.k;
        tile.out += m0 * p.n;
        const int64_t rows = std::min(kBatchRows, p.m - m0);
        switch (kKind == kUint4 ? 0 : p.group) {  // GGUF's block sizes get their own loops
          case 32: TileRows<kKind, kOffset, 32>(tile, n0, rows); break;
          case 64: TileRows<kKind, kOffset, 64>(tile, n0, rows); break;
          case 128: TileRows<kKind, kOffset, 128>(tile, n0, rows); break;
          default: TileRows<kKind, kOffset, 0>(tile, n0, rows); break;
        }
      }
    }
  });
#else
  ParallelFor(pool, p.m, tasks, p.k, [&p](int64_t t, float* row) {
    ScalarTask<kKind, kOffset>(p, t * kTaskRows, std::min(p.n, (t + 1) * kTaskRows), row);
  });
#endif
}

}  // namespace
