// The rollout engine's decoder body for one decode step on the CPU, in one call.
//
// The same math as hrpo/fast_decoder.py::FastDecoder.decode (HF's Qwen2/Qwen3/Llama layer:
// RMSNorm, packed q|k|v projection, optional per-head q/k RMSNorm, rotary, attention over the
// static cache, o projection, RMSNorm, packed gate|up, SiLU * up, down projection). At rollout
// batch sizes the torch version is ~45 small ops per layer whose dispatch costs more than
// their arithmetic; here the elementwise work, rotary, the cache write and the attention are
// plain loops and only the four projections go through ATen (oneDNN's prepacked GEMM when
// the caller packed the weight, as FastDecoder does, else at::linear), each followed by its
// unmerged LoRA adapters when it has some (FastDecoder's _Adapters.add_to, in the same ATen ops).
//
// fp32 or bf16 (one template, T). In bf16 each loop rounds to bf16 where the torch body's op
// does (a torch bf16 elementwise op computes in fp32 and rounds its output): RMSNorm as HF's,
// fp32 inside and `weight * x.to(bf16)`; rotary's two products and their sum; the attention
// in fp32 over the bf16 cache, rounded once (decode_attention_reference: SDPA in fp32, then
// .to(bf16)). The residual stream, the GEMMs' outputs and the cache stay bf16.
#include "decode_body_cpu.h"

#include "poly_exp.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace hrpo {
namespace {

// Index of each tensor within a layer's group in `weights` (FastDecoder.cpu_weights order):
// the norms, then each packed matrix's group of kProj tensors starting at kQkv, kO, kGateUp, kDown.
enum W : int { kLn1, kQNorm, kKNorm, kLn2, kQkv, kO = kQkv + kProj, kGateUp = kO + kProj, kDown = kGateUp + kProj };
// Within a matrix's group: weight, its oneDNN-packed copy, bias, LoRA A, LoRA B, LoRA scale.
enum P : int { kWeight, kPacked, kBias, kLoraA, kLoraB, kLoraScale };
static_assert(kDown + kProj == kPerLayer, "kPerLayer counts the norms and four matrix groups");

using OptT = std::optional<torch::Tensor>;
using bf16 = c10::BFloat16;

bool has(const OptT& t) { return t.has_value() && t->defined(); }

// Element conversions of the two dtypes; rnd<T> is what storing a float as T keeps.
inline float to_f(float v) { return v; }
inline float to_f(bf16 v) {
  const uint32_t b = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
template <typename T>
inline T from_f(float v) {
  return static_cast<T>(v);  // bf16: round to nearest even, as ATen's conversions
}
template <typename T>
inline float rnd(float v) {
  return to_f(from_f<T>(v));
}

// x W^T + b through the op FastDecoder.linear calls from Python (same GEMM, same bits).
torch::Tensor base_linear(const torch::Tensor& x, const OptT& w, const OptT& packed, const OptT& bias) {
  if (!has(packed)) return at::linear(x, *w, has(bias) ? *bias : OptT());
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, *packed, has(bias) ? c10::IValue(*bias) : c10::IValue(),
                                 c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                 c10::IValue(std::string(""))};
  op.callBoxed(stack);
  return stack[0].toTensor();
}

// One packed matrix (its group of kProj tensors): the base GEMM, then the unmerged adapters as
// _Adapters.add_to adds them: y += ((x A^T) * s) B^T, the low-rank product in the adapters'
// dtype, (u * s) in fp32 rounded to u's dtype, the result rounded to y's dtype, added in place.
torch::Tensor linear(const torch::Tensor& x, const OptT* g) {
  torch::Tensor y = base_linear(x, g[kWeight], g[kPacked], g[kBias]);
  if (!has(g[kLoraA])) return y;
  const torch::Tensor &a = *g[kLoraA], &b = *g[kLoraB], &s = *g[kLoraScale];
  const torch::Tensor u = at::mm(x.to(a.scalar_type()), a.t());
  y.add_(at::mm(at::mul(u, s).to(u.scalar_type()), b.t()).to(y.scalar_type()));
  return y;
}

// sum a[i] * b[i] in fp32 in 16 independent lanes, which the compiler keeps in SIMD registers
// (one running sum would be a chain of dependent adds, 4x slower at head_dim 64).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; ++u) acc[u] += to_f(a[i + u]) * to_f(b[i + u]);
  float s = 0.f;
  for (; i < n; ++i) s += to_f(a[i]) * to_f(b[i]);
  for (int u = 0; u < 16; ++u) s += acc[u];
  return s;
}

// HF's RMSNorm: w * (x * rsqrt(mean(x^2) + eps)).to(T), statistics in fp32, one row of n values.
template <typename T>
inline void rms_row(const T* x, const T* w, float eps, int64_t n, T* out) {
  const float ss = dot(x, x, n);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(to_f(w[i]) * rnd<T>(to_f(x[i]) * r));
}

// x * cos + rotate_half(x) * sin in place on one head (halves, not interleaved pairs); in T,
// each product and the sum rounded as its torch op rounds it.
template <typename T>
inline void rotate_row(T* x, const T* cos, const T* sin, int64_t dh, float* tmp) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < dh; ++i) {
    const float other = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
    tmp[i] = rnd<T>(rnd<T>(to_f(x[i]) * to_f(cos[i])) + rnd<T>(other * to_f(sin[i])));
  }
  for (int64_t i = 0; i < dh; ++i) x[i] = from_f<T>(tmp[i]);
}

// One (row, kv head): q holds its G query heads (G x Dh), k / v its slots [0, len) with row
// stride `stride`; softmax(q k^T * scale) v in fp32 into out (G x Dh), rounded to T once.
// Scratch: p (G x len), qf and of (G x Dh each).
template <typename T>
__attribute__((always_inline)) inline void attend(const T* q, const T* k, const T* v, int64_t len, int64_t stride,
                                                  int64_t G, int64_t Dh, float scale, float* p, float* qf, float* of,
                                                  T* out) {
  for (int64_t i = 0; i < G * Dh; ++i) qf[i] = to_f(q[i]);
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * len;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      pg[j] = dot(qf + g * Dh, k + j * stride, Dh) * scale;
      mx = std::max(mx, pg[j]);
    }
    for (int64_t j = 0; j < len; ++j) pg[j] = poly_exp(pg[j] - mx);  // apart from the sum: this loop vectorises
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) sum += pg[j];
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < len; ++j) pg[j] *= inv;
  }
  std::fill(of, of + G * Dh, 0.f);
  for (int64_t j = 0; j < len; ++j) {  // one pass over V for all G heads
    const T* vj = v + j * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float pj = p[g * len + j];
      float* o = of + g * Dh;
      for (int64_t i = 0; i < Dh; ++i) o[i] += pj * to_f(vj[i]);
    }
  }
  for (int64_t i = 0; i < G * Dh; ++i) out[i] = from_f<T>(of[i]);
}

// Clones for AVX-512 and AVX2 beside the baseline build, picked at load time: the attention
// loops are the body's only arithmetic outside ATen and run 2-4x faster in wide SIMD. (The
// clones are plain functions: GCC does not clone templates.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HRPO_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HRPO_SIMD_CLONES
#endif
#define HRPO_ATTEND(T)                                                                                              \
  HRPO_SIMD_CLONES void attend_simd(const T* q, const T* k, const T* v, int64_t len, int64_t stride, int64_t G,    \
                                    int64_t Dh, float scale, float* p, float* qf, float* of, T* out) {             \
    attend<T>(q, k, v, len, stride, G, Dh, scale, p, qf, of, out);                                                 \
  }
HRPO_ATTEND(float)
HRPO_ATTEND(bf16)
#undef HRPO_ATTEND

template <typename T>
void rms_rows(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const T *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
  T* po = out.data_ptr<T>();
  for (int64_t b = 0; b < n; ++b) rms_row(px + b * d, pw, static_cast<float>(eps), d, po + b * d);
}

void check_args(const torch::Tensor& x, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                const torch::Tensor& seqlens, const torch::Tensor& cos, const torch::Tensor& sin,
                const std::vector<OptT>& weights, const torch::Tensor& norm_w, const std::vector<double>& eps,
                int64_t n_heads) {
  const char* op = "decode_body_cpu";
  const int64_t L = k_cache.size(0), S = k_cache.size(2), Hkv = k_cache.size(3), Dh = k_cache.size(4);
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer, op, ": expected ", L * kPerLayer,
              " layer tensors, got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == L * 4 + 1, op, ": expected ", L * 4 + 1, " eps values, got ",
              eps.size());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16, op, ": x must be fp32 or bf16, got ", dt);
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &k_cache, &v_cache, &cos, &sin, &norm_w})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->is_contiguous(), op,
                ": every activation, cache, table and norm must be a contiguous CPU tensor of x's dtype ", dt,
                ", got ", t->scalar_type(), " on ", t->device());
  for (int64_t i = 0; i < L * kPerLayer; ++i)
    if (i % kPerLayer < kQkv && has(weights[i]))
      TORCH_CHECK(weights[i]->scalar_type() == dt && weights[i]->is_contiguous(), op, ": layer ", i / kPerLayer,
                  " norm ", i % kPerLayer, " must be contiguous ", dt, ", got ", weights[i]->scalar_type());
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache / v_cache must be equal (L, B, S, Hkv, Dh), got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(x.dim() == 2 && n <= k_cache.size(1) && d == norm_w.numel(), op, ": x must be (n <= ",
              k_cache.size(1), ", ", norm_w.numel(), "), got ", x.sizes());
  TORCH_CHECK(n_heads % Hkv == 0 && Dh % 2 == 0 && cos.dim() == 2 && cos.size(1) == Dh && sin.sizes() == cos.sizes(),
              op, ": ", n_heads, " query heads over ", Hkv, " kv heads of ", Dh, " with rotary tables ", cos.sizes());
  TORCH_CHECK(seqlens.scalar_type() == torch::kInt32 && seqlens.is_contiguous() && seqlens.numel() >= n, op,
              ": seqlens must be a contiguous int32 tensor of >= ", n, " rows");
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(lens[b] >= 0 && lens[b] < S && lens[b] < cos.size(0), op, ": row ", b, " is at slot ", lens[b],
                ", past the cache (", S, " slots) or the rotary table (", cos.size(0), ")");
}

// The body in T (arguments checked by check_args).
template <typename T>
torch::Tensor body(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache, torch::Tensor& seqlens,
                   const torch::Tensor& cos, const torch::Tensor& sin, const std::vector<OptT>& weights,
                   const torch::Tensor& norm_w, const std::vector<double>& eps, int64_t n_heads, double scale) {
  const int64_t L = k_cache.size(0), S = k_cache.size(2), Hkv = k_cache.size(3), Dh = k_cache.size(4);
  const int64_t n = x.size(0);
  const int64_t H = n_heads, G = H / Hkv, nq = H * Dh, nk = Hkv * Dh;
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  torch::Tensor h = x.clone();
  torch::Tensor xn = torch::empty_like(h);
  torch::Tensor att = torch::empty({n, nq}, h.options());
  const T *pcos = cos.data_ptr<T>(), *psin = sin.data_ptr<T>();
  const int64_t row_stride = S * Hkv * Dh;  // one cache row of one layer
  const int64_t layer_stride = k_cache.size(1) * row_stride;

  for (int64_t l = 0; l < L; ++l) {
    const OptT* w = weights.data() + l * kPerLayer;
    const double* e = eps.data() + l * 4;
    rms_rows<T>(h, *w[kLn1], e[0], xn);
    torch::Tensor qkv = linear(xn, w + kQkv).contiguous();
    T* pqkv = qkv.data_ptr<T>();
    T* kc = k_cache.data_ptr<T>() + l * layer_stride;
    T* vc = v_cache.data_ptr<T>() + l * layer_stride;
    const T* qn = has(w[kQNorm]) ? w[kQNorm]->data_ptr<T>() : nullptr;
    const T* kn = has(w[kKNorm]) ? w[kKNorm]->data_ptr<T>() : nullptr;

    // q / k norm and rotary at each row's position; k and v into the cache at that slot.
    std::vector<float> tmp(Dh);
    std::vector<T> normed(Dh);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t pos = lens[b];
      const T *c = pcos + pos * Dh, *s = psin + pos * Dh;
      T* row = pqkv + b * (nq + 2 * nk);
      for (int64_t hh = 0; hh < H + Hkv; ++hh) {
        T* head = row + hh * Dh;  // q heads, then k heads
        const T* nw = hh < H ? qn : kn;
        if (nw) {
          rms_row(head, nw, static_cast<float>(e[hh < H ? 2 : 3]), Dh, normed.data());
          std::copy(normed.begin(), normed.end(), head);
        }
        rotate_row(head, c, s, Dh, tmp.data());
      }
      std::copy(row + nq, row + nq + nk, kc + b * row_stride + pos * nk);
      std::copy(row + nq + nk, row + nq + 2 * nk, vc + b * row_stride + pos * nk);
    }

    // Attention of each (row, kv head): its G query heads over the row's slots [0, pos].
    T* patt = att.data_ptr<T>();
    at::parallel_for(0, n * Hkv, 4, [&](int64_t lo, int64_t hi) {
      std::vector<float> p(G * S), qf(G * Dh), of(G * Dh);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / Hkv, kvh = task % Hkv;
        attend_simd(pqkv + b * (nq + 2 * nk) + kvh * G * Dh, kc + b * row_stride + kvh * Dh,
                    vc + b * row_stride + kvh * Dh, lens[b] + 1, nk, G, Dh, static_cast<float>(scale), p.data(),
                    qf.data(), of.data(), patt + b * nq + kvh * G * Dh);
      }
    });

    h.add_(linear(att, w + kO));
    rms_rows<T>(h, *w[kLn2], e[1], xn);
    torch::Tensor gu = linear(xn, w + kGateUp).contiguous();
    const int64_t inter = gu.size(1) / 2;  // ATen's SiLU: its vectorised exp is far faster than a scalar loop
    torch::Tensor m = at::silu(gu.narrow(1, 0, inter)).mul_(gu.narrow(1, inter, inter));
    h.add_(linear(m, w + kDown));
  }
  int32_t* plens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < n; ++b) plens[b] += 1;
  torch::Tensor out = torch::empty_like(h);
  rms_rows<T>(h, norm_w, eps[L * 4], out);
  return out;
}

}  // namespace

torch::Tensor decode_body_cpu(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              torch::Tensor& seqlens, const torch::Tensor& cos, const torch::Tensor& sin,
                              const std::vector<OptT>& weights, const torch::Tensor& norm_w,
                              const std::vector<double>& eps, int64_t n_heads, double scale) {
  check_args(x, k_cache, v_cache, seqlens, cos, sin, weights, norm_w, eps, n_heads);
  if (x.scalar_type() == torch::kBFloat16)
    return body<bf16>(x, k_cache, v_cache, seqlens, cos, sin, weights, norm_w, eps, n_heads, scale);
  return body<float>(x, k_cache, v_cache, seqlens, cos, sin, weights, norm_w, eps, n_heads, scale);
}

}  // namespace hrpo
