// Quantized matmul on the CPU as an XLA FFI handler: out = x @ dequantize(w).T in exact float math.
//
// x [M, K] f32; q [L, N, K] int8 / fp8 (e4m3fn) / f16 / bf16, or [L, N, K/2] uint8 (two uint4, element 2j
// low nibble);
// scale [L, N, K/group] f32; offset: the same, or an empty array for none; layer [] int32 (the stacked
// weights are read at it); attribute group (a multiple of 16, or K). Out [M, N] f32, with
// w[n, k] = scale[n, k / group] * value(q[n, k]) + offset[n, k / group], as `reference.qmatmul`.
//
// Register tiles of 4 weight rows x 4 rows of x: 32 weights of each weight row are decoded and
// dequantized into registers (one FMA each, as the reference's float math; uint4 looks its 16 possible
// values up in a per-group table of those FMAs' results), then FMA'd into the 16
// accumulators, so each decode serves 4 rows of x. The weight bytes are read from memory once (a tile's
// rows stay in L1 while the rows of x take turns) and prefetched two tiles ahead: one core does not keep
// enough lines in flight to stream at memory bandwidth on its own. (Decoding a [16, 512] tile into an
// L1 buffer once for all rows of x instead measured 1.6x slower at M = 8 and no faster at M = 32: the
// buffer's stores and reloads cost more than the repeated decode.) Work is split over N between the
// calling thread and the library's spinning helpers (native_qmatmul_threads.h), as many threads in all
// as XLA's intra-op pool has.
//
// Files: this one, the FFI entry; native_qmatmul_common.h (problem, kinds, scalar decode);
// native_qmatmul_float.h (the float path); native_qmatmul_int8.h (the integer path, below).
//
// Attribute int8_activations (nonzero): for kinds int8 and uint4 with groups that are multiples of 32 (or
// K), x is first quantized per row into int8 blocks of 32 (Q8_0: scale d = absmax / 127, round to
// nearest), and each block of weights is dotted with it in integers (AVX-512 VNNI vpdpbusd: 64 u8 x s8
// multiply-adds per instruction) before one float multiply by d * the weight scale; the offset term is
// offset[g] * sum over g's blocks of d * (sum of the block's int8 x). Error: |x - x^| <= absmax / 254 per
// element, so |y - y^| <= sum over blocks of absmax / 254 * sum |w| (plus float rounding). Other kinds and
// groups (fp8, f16, bf16, group 16) keep the float path.
//
// Attribute bf16_dot (nonzero; built for CPUs with AVX-512 BF16; K in whole 32-blocks each in one group):
// x and each 32 dequantized weights rounded to bf16 and dotted in pairs by vdpbf16ps with float32 sums
// (native_qmatmul_bf16.h), in register tiles of 4 weight rows x 6 rows of x. Error: within
// 2^-7 * sum_k |x| |w| of the float math.
#include "native_qmatmul_common.h"
#include "native_qmatmul_bf16.h"
#include "native_qmatmul_float.h"
#include "native_qmatmul_int8.h"
#include "native_qmatmul_threads.h"

namespace {

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer, int64_t group,
                       int64_t int8_activations, int64_t bf16_dot, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 3) {
    return ffi::Error::InvalidArgument("qmatmul: x [M,K], q [L,N,Kq], scale [L,N,G] expected");
  }
  Kind kind;
  switch (q.element_type()) {
    case ffi::DataType::S8: kind = kInt8; break;
    case ffi::DataType::U8: kind = kUint4; break;
    case ffi::DataType::F8E4M3FN: kind = kFp8; break;
    case ffi::DataType::F16: kind = kF16; break;
    case ffi::DataType::BF16: kind = kBf16; break;
    default: return ffi::Error::InvalidArgument("qmatmul: q must be int8, uint8 (uint4 pairs), float8_e4m3fn, f16 or bf16");
  }
  Problem p{};
  p.m = xd[0];
  p.k = xd[1];
  p.n = qd[1];
  p.group = group;
  p.row_bytes = qd[2] * (IsHalf(kind) ? 2 : 1);
  const int64_t layers = qd[0];
  if (group <= 0 || p.k % group != 0 || (group % kBlock != 0 && group != p.k) ||
      qd[2] != (kind == kUint4 ? p.k / 2 : p.k) || (kind == kUint4 && p.k % 2 != 0)) {
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
  if (has_offset && IsHalf(kind)) return ffi::Error::InvalidArgument("qmatmul: f16 and bf16 weights take no offset");
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
  if (int8_activations && (kind == kInt8 || kind == kUint4) && (p.group % kQBlock == 0 || p.group == p.k)) {
    switch (kind * 2 + has_offset) {
      case kInt8 * 2: RunInt<false, false>(pool, p); break;
      case kInt8 * 2 + 1: RunInt<false, true>(pool, p); break;
      case kUint4 * 2: RunInt<true, false>(pool, p); break;
      default: RunInt<true, true>(pool, p); break;
    }
    return ffi::Error::Success();
  }
  const bool paired = p.group % (2 * kBlock) == 0 || p.group == p.k;
#if JAXLLM_BF16
  if (bf16_dot && Bf16Takes(p) && !(kind == kUint4 && !paired)) {
    switch (kind * 2 + has_offset) {
      case kInt8 * 2: RunBf16<kInt8, false>(pool, p); break;
      case kInt8 * 2 + 1: RunBf16<kInt8, true>(pool, p); break;
      case kUint4 * 2: RunBf16<kUint4Paired, false>(pool, p); break;
      case kUint4 * 2 + 1: RunBf16<kUint4Paired, true>(pool, p); break;
      case kFp8 * 2: RunBf16<kFp8, false>(pool, p); break;
      case kFp8 * 2 + 1: RunBf16<kFp8, true>(pool, p); break;
      case kF16 * 2: RunBf16<kF16, false>(pool, p); break;
      default: RunBf16<kBf16, false>(pool, p); break;
    }
    return ffi::Error::Success();
  }
#endif
  switch (kind * 2 + has_offset) {
    case kInt8 * 2: Run<kInt8, false>(pool, p); break;
    case kInt8 * 2 + 1: Run<kInt8, true>(pool, p); break;
    case kUint4 * 2: paired ? Run<kUint4Paired, false>(pool, p) : Run<kUint4, false>(pool, p); break;
    case kUint4 * 2 + 1: paired ? Run<kUint4Paired, true>(pool, p) : Run<kUint4, true>(pool, p); break;
    case kFp8 * 2: Run<kFp8, false>(pool, p); break;
    case kFp8 * 2 + 1: Run<kFp8, true>(pool, p); break;
    case kF16 * 2: Run<kF16, false>(pool, p); break;
    default: Run<kBf16, false>(pool, p); break;
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
                                  .Attr<int64_t>("bf16_dot")
                                  .Ret<ffi::Buffer<ffi::F32>>());
