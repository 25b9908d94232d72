// Paged attention on the CPU as an XLA FFI handler: ragged new tokens against their sequences' paged context.
//
// q [tokens, heads, head_dim]; k_new, v_new [tokens, kv_heads, head_dim]; k_cache, v_cache
// [layers, pages, page_size, kv_heads, head_dim] (the stacked cache, read at `layer`); layer [] int32;
// block_tables [seqs, n_pages] int32; ctx_lens [seqs] int32 (cached positions of each sequence);
// q_starts [seqs] int32 (index of each sequence's first new token); seq_ids [tokens] int32 (the sequence
// of each token; out of range: a padding token, whose output is zero); attribute window (0: none).
// Out [tokens, heads, head_dim]. Token t of sequence s sits at position ctx_lens[s] + t - q_starts[s] and
// sees its sequence's first ctx_lens[s] cached positions and its new tokens up to itself (within the
// window), with one softmax: `reference.attention`'s semantics, for any mix of query lengths (a decode
// batch is the case of one token per sequence). Work is split over tokens across XLA's intra-op pool.
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
  int64_t tokens, heads, kv_heads, head_dim, layers, pages, page_size, seqs, n_table;
};

struct Inputs {
  const float *q, *kn, *vn, *kc, *vc;
  int64_t layer;
  const int32_t *tables, *ctx_lens, *q_starts, *seq_ids;
  int64_t window;
};

// One token: all its query heads over the keys it sees (cached positions, then its sequence's new tokens up
// to itself). Keys are the outer loop so that each key row (all kv heads, contiguous) is read once for K and
// once for V.
void AttendToken(const Shapes& s, const Inputs& in, int64_t t, float* out, std::vector<float>& scores) {
  const int64_t h = s.heads, g = s.heads / s.kv_heads, d = s.head_dim;
  float* ot = out + t * h * d;
  std::fill(ot, ot + h * d, 0.f);
  const int64_t seq = in.seq_ids[t];
  if (seq < 0 || seq >= s.seqs || t < in.q_starts[seq]) return;  // padding
  const int32_t* table = in.tables + seq * s.n_table;
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(in.ctx_lens[seq], s.n_table * s.page_size));
  const int64_t first = in.q_starts[seq], pos = n + (t - first);
  const int64_t lo = in.window > 0 ? std::max<int64_t>(0, pos - in.window + 1) : 0;
  const int64_t n_cached = std::max<int64_t>(0, n - lo);  // cached positions [lo, n)
  const int64_t new_first = first + std::max<int64_t>(0, lo - n);  // new tokens [new_first, t]
  const int64_t len = n_cached + (t - new_first + 1);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const float* qt = in.q + t * h * d;
  const int64_t row_stride = s.kv_heads * d;
  const int64_t layer_off = in.layer * s.pages * s.page_size * row_stride;
  auto key_row = [&](const float* cache, const float* fresh, int64_t i) {
    if (i >= n_cached) return fresh + (new_first + i - n_cached) * row_stride;
    const int64_t p = lo + i;
    int64_t page = table[p / s.page_size];
    page = std::min<int64_t>(std::max<int64_t>(page, 0), s.pages - 1);
    return cache + layer_off + (page * s.page_size + p % s.page_size) * row_stride;
  };
  scores.resize(h * len);  // [key][head]
  for (int64_t i = 0; i < len; ++i) {
    const float* k = key_row(in.kc, in.kn, i);
    float* sp = scores.data() + i * h;
    for (int64_t j = 0; j < h; ++j) sp[j] = Dot(qt + j * d, k + (j / g) * d, d) * scale;
  }
  std::vector<float> m(scores.begin(), scores.begin() + h), denom(h, 0.f);
  for (int64_t i = 1; i < len; ++i)
    for (int64_t j = 0; j < h; ++j) m[j] = std::max(m[j], scores[i * h + j]);
  for (int64_t i = 0; i < len; ++i) {
    const float* v = key_row(in.vc, in.vn, i);
    const float* sp = scores.data() + i * h;
    for (int64_t j = 0; j < h; ++j) {
      const float p = std::exp(sp[j] - m[j]);
      denom[j] += p;
      const float* vj = v + (j / g) * d;
      float* o = ot + j * d;
      for (int64_t x = 0; x < d; ++x) o[x] += p * vj[x];
    }
  }
  for (int64_t j = 0; j < h; ++j) {
    const float inv = 1.f / denom[j];
    for (int64_t x = 0; x < d; ++x) ot[j * d + x] *= inv;
  }
}

ffi::Error RaggedPagedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kn,
                           ffi::Buffer<ffi::F32> vn, ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> ctx_lens,
                           ffi::Buffer<ffi::S32> q_starts, ffi::Buffer<ffi::S32> seq_ids, int64_t window,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = kc.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged attention: q [T,H,D], cache [L,P,S,KVH,D], tables [N,P] expected");
  }
  Shapes s{qd[0], qd[1], cd[3], qd[2], cd[0], cd[1], cd[2], td[0], td[1]};
  if (s.heads % s.kv_heads != 0 || cd[4] != s.head_dim) {
    return ffi::Error::InvalidArgument("paged attention: heads must be a multiple of kv heads, head dims equal");
  }
  if (ctx_lens.element_count() != s.seqs || q_starts.element_count() != s.seqs ||
      seq_ids.element_count() != s.tokens) {
    return ffi::Error::InvalidArgument("paged attention: ctx_lens, q_starts [N] and seq_ids [T] expected");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= s.layers) return ffi::Error::InvalidArgument("paged attention: layer index out of range");
  const Inputs in{q.typed_data(),     kn.typed_data(),       vn.typed_data(),      kc.typed_data(),
                  vc.typed_data(),    l,                     tables.typed_data(),  ctx_lens.typed_data(),
                  q_starts.typed_data(), seq_ids.typed_data(), window};
  // Tokens are claimed from a shared counter by this thread and by helpers on XLA's pool. This thread waits
  // only for tokens a helper has claimed and is computing, never for a helper to start: other kernels may
  // hold the pool's threads, waiting the same way. A helper that starts late finds nothing to claim, so
  // what it touches lives on the heap.
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto progress = std::make_shared<Progress>();
  const int64_t tasks = s.tokens;
  if (tasks == 0) return ffi::Error::Success();
  float* op = out->typed_data();
  auto work = [=]() {
    std::vector<float> scores;
    for (int64_t t; (t = progress->next.fetch_add(1)) < tasks;) {
      AttendToken(s, in, t, op, scores);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmRaggedPagedF32, RaggedPagedImpl,
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
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
