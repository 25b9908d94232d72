// Quantized matmul on the CPU as an XLA FFI handler: out = x @ dequantize(w).T in exact float math.
//
// x [M, K] f32; q [L, N, K] int8 / fp8 (e4m3fn) or [L, N, K/2] uint8 (two uint4, element 2j low nibble);
// scale [L, N, K/group] f32; offset: the same, or an empty array for none; layer [] int32 (the stacked
// weights are read at it); attribute group (a multiple of 16, or K). Out [M, N] f32, with
// w[n, k] = scale[n, k / group] * value(q[n, k]) + offset[n, k / group], as `reference.qmatmul`.
//
// Register tiles of 4 weight rows x 4 rows of x: 32 weights of each weight row are decoded and
// dequantized into registers (one FMA each, as the reference's float math), then FMA'd into the 16
// accumulators, so each decode serves 4 rows of x. The weight bytes are read from memory once (a tile's
// rows stay in L1 while the rows of x take turns) and prefetched two tiles ahead: one core does not keep
// enough lines in flight to stream at memory bandwidth on its own. (Decoding a [16, 512] tile into an
// L1 buffer once for all rows of x instead measured 1.6x slower at M = 8 and no faster at M = 32: the
// buffer's stores and reloads cost more than the repeated decode.) Work is split over N across XLA's
// intra-op thread pool.
//
// Attribute int8_activations (nonzero): for kinds int8 and uint4 with groups that are multiples of 32 (or
// K), x is first quantized per row into int8 blocks of 32 (Q8_0: scale d = absmax / 127, round to
// nearest), and each block of weights is dotted with it in integers (AVX-512 VNNI vpdpbusd: 64 u8 x s8
// multiply-adds per instruction) before one float multiply by d * the weight scale; the offset term is
// offset[g] * sum over g's blocks of d * (sum of the block's int8 x). Error: |x - x^| <= absmax / 254 per
// element, so |y - y^| <= sum over blocks of absmax / 254 * sum |w| (plus float rounding). Other kinds and
// groups (fp8, group 16) keep the float path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
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
enum Kind { kInt8, kUint4, kFp8, kUint4Paired };

constexpr bool IsUint4(int kind) { return kind == kUint4 || kind == kUint4Paired; }

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

template <Kind kKind>
inline float Value(const uint8_t* row, int64_t k) {
  if constexpr (kKind == kInt8) return static_cast<float>(static_cast<int8_t>(row[k]));
  if constexpr (IsUint4(kKind)) return static_cast<float>((row[k >> 1] >> ((k & 1) * 4)) & 0xF);
  if constexpr (kKind == kFp8) return Fp8ToFloat(row[k]);
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
  } else if constexpr (kKind == kUint4Paired) {  // elements k, k + 2, ..., then k + 1, k + 3, ...
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
    v0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
    v1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  } else {
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

  RowReader(const Problem& p, int64_t n)
      : q(p.q + n * p.row_bytes), scale(p.scale + n * p.groups), offset(kOffset ? p.offset + n * p.groups : nullptr) {}
  void SetGroup(int64_t g) {
    s = _mm512_set1_ps(scale[g] * ScaleFactor<kKind>());
    if constexpr (kOffset) o = _mm512_set1_ps(offset[g]);
  }
  __m512 Dequant(__m512 v) const {
    if constexpr (kOffset) return _mm512_fmadd_ps(v, s, o);
    return _mm512_mul_ps(v, s);
  }
  __m512 Weights16(int64_t k) const { return Dequant(Values16<kKind>(q, k)); }
  void Weights32(int64_t k, __m512& w0, __m512& w1) const {
    Values32<kKind>(q, k, w0, w1);
    w0 = Dequant(w0);
    w1 = Dequant(w1);
  }
};

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

// Weight rows n0 .. n0 + 4 (clamped to the last row; extra columns are not stored) against kM rows of x.
// Every 32 weights are decoded into registers once and used by every row of x. kGroup: the group size
// when known at compile time (the per-group loop then unrolls away), else 0.
template <Kind kKind, bool kOffset, int kM, int kGroup>
void FusedTile(const Problem& p, int64_t n0) {
  using Reader = RowReader<kKind, kOffset>;
  Reader rows[kRows] = {Reader(p, std::min(n0, p.n - 1)), Reader(p, std::min(n0 + 1, p.n - 1)),
                        Reader(p, std::min(n0 + 2, p.n - 1)), Reader(p, std::min(n0 + 3, p.n - 1))};
  __m512 acc[kM][kRows];
  _Pragma("GCC unroll 8")
  for (int i = 0; i < kM; ++i)
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t group = kGroup ? kGroup : p.group;
  const int64_t full = group - group % kBlock;  // the tail is nonzero only when group == K
  const int64_t pairs = full - full % (2 * kBlock);
  const int64_t ahead = 2 * kRows * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    _Pragma("GCC unroll 8")
    for (int j = 0; j < kRows; ++j) rows[j].SetGroup(g);
    const int64_t base = g * group;
    for (int64_t k = base; k < base + pairs; k += 2 * kBlock) {
      __m512 w0[kRows], w1[kRows];
      _Pragma("GCC unroll 8")
      for (int j = 0; j < kRows; ++j) {
        rows[j].Weights32(k, w0[j], w1[j]);
        // One core streams too few lines at once to reach memory bandwidth: ask for the next tile's.
        _mm_prefetch(reinterpret_cast<const char*>(rows[j].q + ahead + (IsUint4(kKind) ? k / 2 : k)), _MM_HINT_T0);
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

// Runs task(t, scratch) for t in [0, tasks) on this thread and on helpers from XLA's pool. Tasks are
// claimed from a shared counter; this thread waits only for tasks a helper has claimed and is running,
// never for a helper to start: other kernels may hold the pool's threads, waiting the same way. A helper
// that starts late finds nothing to claim, so what it touches lives on the heap.
template <typename Task>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, int64_t scratch_floats, Task task) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    std::unique_ptr<float[]> raw;
    float* scratch = nullptr;
    for (int64_t t; (t = progress->next.fetch_add(1)) < tasks;) {
      if (scratch_floats && !scratch) {
        raw.reset(new float[scratch_floats + 16]);
        scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t{63});
      }
      task(t, scratch);
      if (progress->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->done.load() == tasks; });
}

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
  ParallelFor(pool, tasks, 0, [&p](int64_t t, float*) {
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
  ParallelFor(pool, tasks, p.k, [&p](int64_t t, float* row) {
    ScalarTask<kKind, kOffset>(p, t * kTaskRows, std::min(p.n, (t + 1) * kTaskRows), row);
  });
#endif
}

// ---- The integer path (attribute int8_activations) ----

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
  ParallelFor(pool, tasks, 0, [&p, &x, scales](int64_t t, float*) {
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
  ParallelFor(pool, tasks, x.blocks * kQBlock / 4, [&p, &x](int64_t t, float* scratch) {
    IntScalarTask<kUint4W, kOffset>(p, x, t * kTaskRows, std::min(p.n, (t + 1) * kTaskRows),
                                    reinterpret_cast<int8_t*>(scratch));
  });
#endif
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer, int64_t group,
                       int64_t int8_activations, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 3) {
    return ffi::Error::InvalidArgument("qmatmul: x [M,K], q [L,N,Kq], scale [L,N,G] expected");
  }
  Kind kind;
  switch (q.element_type()) {
    case ffi::DataType::S8: kind = kInt8; break;
    case ffi::DataType::U8: kind = kUint4; break;
    case ffi::DataType::F8E4M3FN: kind = kFp8; break;
    default: return ffi::Error::InvalidArgument("qmatmul: q must be int8, uint8 (uint4 pairs) or float8_e4m3fn");
  }
  Problem p{};
  p.m = xd[0];
  p.k = xd[1];
  p.n = qd[1];
  p.group = group;
  p.row_bytes = qd[2];
  const int64_t layers = qd[0];
  if (group <= 0 || p.k % group != 0 || (group % kBlock != 0 && group != p.k) ||
      p.row_bytes != (kind == kUint4 ? p.k / 2 : p.k) || (kind == kUint4 && p.k % 2 != 0)) {
    return ffi::Error::InvalidArgument("qmatmul: K, group and q's last dim disagree");
  }
  p.groups = p.k / group;
  if (sd[0] != layers || sd[1] != p.n || sd[2] != p.groups) {
    return ffi::Error::InvalidArgument("qmatmul: scale must be [L, N, K / group]");
  }
  const bool has_offset = offset.element_count() != 0;
  if (has_offset && offset.element_count() != scale.element_count()) {
    return ffi::Error::InvalidArgument("qmatmul: offset must be shaped like scale, or empty");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("qmatmul: layer index out of range");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
  p.x = x.typed_data();
  p.q = static_cast<const uint8_t*>(q.untyped_data()) + l * p.n * p.row_bytes;
  p.scale = scale.typed_data() + l * p.n * p.groups;
  p.offset = has_offset ? offset.typed_data() + l * p.n * p.groups : nullptr;
  p.out = out->typed_data();
  if (p.k == 0) {
    std::fill(p.out, p.out + p.m * p.n, 0.f);
    return ffi::Error::Success();
  }
  if (int8_activations && kind != kFp8 && (p.group % kQBlock == 0 || p.group == p.k)) {
    switch (kind * 2 + has_offset) {
      case kInt8 * 2: RunInt<false, false>(pool, p); break;
      case kInt8 * 2 + 1: RunInt<false, true>(pool, p); break;
      case kUint4 * 2: RunInt<true, false>(pool, p); break;
      default: RunInt<true, true>(pool, p); break;
    }
    return ffi::Error::Success();
  }
  const bool paired = p.group % (2 * kBlock) == 0 || p.group == p.k;
  switch (kind * 2 + has_offset) {
    case kInt8 * 2: Run<kInt8, false>(pool, p); break;
    case kInt8 * 2 + 1: Run<kInt8, true>(pool, p); break;
    case kUint4 * 2: paired ? Run<kUint4Paired, false>(pool, p) : Run<kUint4, false>(pool, p); break;
    case kUint4 * 2 + 1: paired ? Run<kUint4Paired, true>(pool, p) : Run<kUint4, true>(pool, p); break;
    case kFp8 * 2: Run<kFp8, false>(pool, p); break;
    default: Run<kFp8, true>(pool, p); break;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmQMatmulF32, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("int8_activations")
                                  .Ret<ffi::Buffer<ffi::F32>>());
