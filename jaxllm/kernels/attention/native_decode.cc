// Paged decode attention on the CPU as an XLA FFI handler: one new token per row against its paged context.
//
// q [batch, heads, head_dim]; k_new, v_new [batch, kv_heads, head_dim]; k_cache, v_cache
// [layers, pages, page_size, kv_heads, head_dim] (the stacked cache, read at `layer`); layer [] int32;
// block_tables [batch, n_pages] int32; ctx_lens [batch] int32; attribute window (0: none).
// Out [batch, heads, head_dim]. Same semantics as `reference.attention` for one new token: each row sees
// its first ctx_lens[b] cached positions (within the window) and its own new key, with one softmax.
// Work is split over rows across XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

struct Shapes {
  int64_t batch, heads, kv_heads, head_dim, layers, pages, page_size, n_table;
};

// One row: all its query heads over its cached positions plus the new token. Positions are the outer loop
// so that each cached token row (all kv heads, contiguous) is read from memory once for K and once for V.
void AttendRow(const Shapes& s, int64_t b, const float* q, const float* kn, const float* vn, const float* kc,
               const float* vc, int64_t layer, const int32_t* tables, const int32_t* ctx_lens, int64_t window,
               float* out, std::vector<float>& scores) {
  const int64_t h = s.heads, g = s.heads / s.kv_heads, d = s.head_dim;
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(ctx_lens[b], s.n_table * s.page_size));
  const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window + 1) : 0;
  const int64_t len = n - lo + 1;  // cached positions seen, then the new token
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const float* qb = q + b * h * d;
  const int64_t row_stride = s.kv_heads * d;
  const int64_t layer_off = layer * s.pages * s.page_size * row_stride;
  auto token_row = [&](const float* cache, int64_t pos) {
    int64_t page = tables[b * s.n_table + pos / s.page_size];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), s.pages - 1);
    return cache + layer_off + (page * s.page_size + pos % s.page_size) * row_stride;
  };
  scores.resize(h * len);  // [position][head]
  for (int64_t pos = lo; pos <= n; ++pos) {
    const float* k = pos < n ? token_row(kc, pos) : kn + b * row_stride;
    float* sp = scores.data() + (pos - lo) * h;
    for (int64_t j = 0; j < h; ++j) sp[j] = Dot(qb + j * d, k + (j / g) * d, d) * scale;
  }
  std::vector<float> m(scores.begin(), scores.begin() + h), denom(h, 0.f);
  for (int64_t i = 1; i < len; ++i)
    for (int64_t j = 0; j < h; ++j) m[j] = std::max(m[j], scores[i * h + j]);
  float* ob = out + b * h * d;
  std::fill(ob, ob + h * d, 0.f);
  for (int64_t pos = lo; pos <= n; ++pos) {
    const float* v = pos < n ? token_row(vc, pos) : vn + b * row_stride;
    const float* sp = scores.data() + (pos - lo) * h;
    for (int64_t j = 0; j < h; ++j) {
      const float p = std::exp(sp[j] - m[j]);
      denom[j] += p;
      const float* vj = v + (j / g) * d;
      float* o = ob + j * d;
      for (int64_t i = 0; i < d; ++i) o[i] += p * vj[i];
    }
  }
  for (int64_t j = 0; j < h; ++j) {
    const float inv = 1.f / denom[j];
    for (int64_t i = 0; i < d; ++i) ob[j * d + i] *= inv;
  }
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kn,
                           ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> ctx_lens,
                           int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = kc.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged decode: q [B,H,D], cache [L,P,S,KVH,D], tables [B,N] expected");
  }
  Shapes s{qd[0], qd[1], cd[3], qd[2], cd[0], cd[1], cd[2], td[1]};
  if (s.heads % s.kv_heads != 0 || cd[4] != s.head_dim) {
    return ffi::Error::InvalidArgument("paged decode: heads must be a multiple of kv heads, head dims equal");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= s.layers) return ffi::Error::InvalidArgument("paged decode: layer index out of range");
  // Rows are claimed from a shared counter by this thread and by helpers on XLA's pool. This thread waits
  // only for rows a helper has claimed and is computing, never for a helper to start: other kernels may
  // hold the pool's threads, waiting the same way. A helper that starts late finds nothing to claim, so
  // what it touches lives on the heap.
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto progress = std::make_shared<Progress>();
  const int64_t tasks = s.batch;
  const float *qp = q.typed_data(), *knp = kn.typed_data(), *vnp = vn.typed_data();
  const float *kcp = kc.typed_data(), *vcp = vc.typed_data();
  const int32_t *tp = tables.typed_data(), *cp = ctx_lens.typed_data();
  float* op = out->typed_data();
  auto work = [=]() {
    std::vector<float> scores;
    for (int64_t t; (t = progress->next.fetch_add(1)) < tasks;) {
      AttendRow(s, t, qp, knp, vnp, kcp, vcp, l, tp, cp, window, op, scores);
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
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedDecodeF32, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
