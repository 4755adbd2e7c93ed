// The rollout engine's decoder body for one decode step on the CPU, in one call.
//
// The same math as hrpo/fast_decoder.py::FastDecoder.decode (HF's Qwen2/Qwen3/Llama layer:
// RMSNorm, packed q|k|v projection, optional per-head q/k RMSNorm, rotary, attention over the
// static cache, o projection, RMSNorm, packed gate|up, SiLU * up, down projection). At rollout
// batch sizes the torch version is ~45 small ops per layer whose dispatch costs more than
// their arithmetic; here the elementwise work, rotary, the cache write and the attention are
// plain loops and only the four projections go through ATen (oneDNN's prepacked GEMM when
// the caller packed the weight, as FastDecoder does for fp32, else at::linear). fp32 only.
#include "decode_body_cpu.h"

#include "poly_exp.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace hrpo {
namespace {

// Index of each tensor within a layer's group in `weights` (FastDecoder.cpu_weights order).
enum W : int { kLn1, kQkv, kQkvPacked, kQkvBias, kQNorm, kKNorm, kO, kOPacked, kOBias, kLn2, kGateUp, kGateUpPacked, kDown, kDownPacked };

using OptT = std::optional<torch::Tensor>;

bool has(const OptT& t) { return t.has_value() && t->defined(); }

// y = x W^T + b, through the op FastDecoder.linear calls from Python (same GEMM, same bits).
torch::Tensor linear(const torch::Tensor& x, const OptT& w, const OptT& packed, const OptT& bias) {
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

// sum a[i] * b[i] in 16 independent lanes, which the compiler keeps in SIMD registers (one
// running sum would be a chain of dependent adds, 4x slower at head_dim 64).
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; ++u) acc[u] += a[i + u] * b[i + u];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int u = 0; u < 16; ++u) s += acc[u];
  return s;
}

// HF's RMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)), one row of n values.
inline void rms_row(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float ss = dot(x, x, n);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// x * cos + rotate_half(x) * sin in place on one head (halves, not interleaved pairs).
inline void rotate_row(float* x, const float* cos, const float* sin, int64_t dh, float* tmp) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < half; ++i) tmp[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < dh; ++i) tmp[i] = x[i] * cos[i] + x[i - half] * sin[i];
  std::copy(tmp, tmp + dh, x);
}

// Clones for AVX-512 and AVX2 beside the baseline build, picked at load time: the attention
// loops below are the body's only arithmetic outside ATen and run 2-4x faster in wide SIMD.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HRPO_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HRPO_SIMD_CLONES
#endif

// One (row, kv head): q holds its G query heads (G x Dh), k / v its slots [0, len) with row
// stride `stride`; softmax(q k^T * scale) v into out (G x Dh). p: G x len scratch.
HRPO_SIMD_CLONES
void attend(const float* q, const float* k, const float* v, int64_t len, int64_t stride, int64_t G, int64_t Dh,
            float scale, float* p, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * len;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      pg[j] = dot(q + g * Dh, k + j * stride, Dh) * scale;
      mx = std::max(mx, pg[j]);
    }
    for (int64_t j = 0; j < len; ++j) pg[j] = poly_exp(pg[j] - mx);  // apart from the sum: this loop vectorises
    float sum = 0.f;
    for (int64_t j = 0; j < len; ++j) sum += pg[j];
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < len; ++j) pg[j] *= inv;
  }
  std::fill(out, out + G * Dh, 0.f);
  for (int64_t j = 0; j < len; ++j) {  // one pass over V for all G heads
    const float* vj = v + j * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float pj = p[g * len + j];
      float* o = out + g * Dh;
      for (int64_t i = 0; i < Dh; ++i) o[i] += pj * vj[i];
    }
  }
}

void rms_rows(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out) {
  const int64_t n = x.size(0), d = x.size(1);
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) rms_row(px + b * d, pw, static_cast<float>(eps), d, po + b * d);
}

}  // namespace

torch::Tensor decode_body_cpu(const torch::Tensor& x, torch::Tensor& k_cache, torch::Tensor& v_cache,
                              torch::Tensor& seqlens, const torch::Tensor& cos, const torch::Tensor& sin,
                              const std::vector<OptT>& weights, const torch::Tensor& norm_w,
                              const std::vector<double>& eps, int64_t n_heads, double scale) {
  const char* op = "decode_body_cpu";
  const int64_t L = k_cache.size(0), S = k_cache.size(2), Hkv = k_cache.size(3), Dh = k_cache.size(4);
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t H = n_heads, G = H / Hkv, nq = H * Dh, nk = Hkv * Dh;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer, op, ": expected ", L * kPerLayer,
              " layer tensors, got ", weights.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == L * 4 + 1, op, ": expected ", L * 4 + 1, " eps values, got ",
              eps.size());
  const auto f32 = torch::kFloat32;
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &k_cache, &v_cache, &cos, &sin, &norm_w})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == f32 && t->is_contiguous(), op,
                ": every activation, cache and table must be a contiguous fp32 CPU tensor, got ", t->scalar_type(),
                " on ", t->device());
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache / v_cache must be equal (L, B, S, Hkv, Dh), got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(x.dim() == 2 && n <= k_cache.size(1) && d == norm_w.numel(), op, ": x must be (n <= ",
              k_cache.size(1), ", ", norm_w.numel(), "), got ", x.sizes());
  TORCH_CHECK(H % Hkv == 0 && Dh % 2 == 0 && cos.dim() == 2 && cos.size(1) == Dh && sin.sizes() == cos.sizes(), op,
              ": ", H, " query heads over ", Hkv, " kv heads of ", Dh, " with rotary tables ", cos.sizes());
  TORCH_CHECK(seqlens.scalar_type() == torch::kInt32 && seqlens.is_contiguous() && seqlens.numel() >= n, op,
              ": seqlens must be a contiguous int32 tensor of >= ", n, " rows");
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(lens[b] >= 0 && lens[b] < S && lens[b] < cos.size(0), op, ": row ", b, " is at slot ", lens[b],
                ", past the cache (", S, " slots) or the rotary table (", cos.size(0), ")");

  torch::Tensor h = x.clone();
  torch::Tensor xn = torch::empty_like(h);
  torch::Tensor att = torch::empty({n, nq}, h.options());
  const float *pcos = cos.data_ptr<float>(), *psin = sin.data_ptr<float>();
  const int64_t row_stride = S * Hkv * Dh;  // one cache row of one layer
  const int64_t layer_stride = k_cache.size(1) * row_stride;

  for (int64_t l = 0; l < L; ++l) {
    const OptT* w = weights.data() + l * kPerLayer;
    const double* e = eps.data() + l * 4;
    rms_rows(h, *w[kLn1], e[0], xn);
    torch::Tensor qkv = linear(xn, w[kQkv], w[kQkvPacked], w[kQkvBias]).contiguous();
    float* pqkv = qkv.data_ptr<float>();
    float* kc = k_cache.data_ptr<float>() + l * layer_stride;
    float* vc = v_cache.data_ptr<float>() + l * layer_stride;
    const float* qn = has(w[kQNorm]) ? w[kQNorm]->data_ptr<float>() : nullptr;
    const float* kn = has(w[kKNorm]) ? w[kKNorm]->data_ptr<float>() : nullptr;

    // q / k norm and rotary at each row's position; k and v into the cache at that slot.
    std::vector<float> tmp(Dh);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t pos = lens[b];
      const float *c = pcos + pos * Dh, *s = psin + pos * Dh;
      float* row = pqkv + b * (nq + 2 * nk);
      for (int64_t hh = 0; hh < H + Hkv; ++hh) {
        float* head = row + hh * Dh;  // q heads, then k heads
        const float* nw = hh < H ? qn : kn;
        if (nw) {
          rms_row(head, nw, static_cast<float>(e[hh < H ? 2 : 3]), Dh, tmp.data());
          std::copy(tmp.begin(), tmp.end(), head);
        }
        rotate_row(head, c, s, Dh, tmp.data());
      }
      std::copy(row + nq, row + nq + nk, kc + b * row_stride + pos * nk);
      std::copy(row + nq + nk, row + nq + 2 * nk, vc + b * row_stride + pos * nk);
    }

    // Attention of each (row, kv head): its G query heads over the row's slots [0, pos].
    float* patt = att.data_ptr<float>();
    at::parallel_for(0, n * Hkv, 4, [&](int64_t lo, int64_t hi) {
      std::vector<float> p(G * S);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / Hkv, kvh = task % Hkv;
        attend(pqkv + b * (nq + 2 * nk) + kvh * G * Dh, kc + b * row_stride + kvh * Dh, vc + b * row_stride + kvh * Dh,
               lens[b] + 1, nk, G, Dh, static_cast<float>(scale), p.data(), patt + b * nq + kvh * G * Dh);
      }
    });

    h.add_(linear(att, w[kO], w[kOPacked], w[kOBias]));
    rms_rows(h, *w[kLn2], e[1], xn);
    torch::Tensor gu = linear(xn, w[kGateUp], w[kGateUpPacked], OptT()).contiguous();
    const int64_t inter = gu.size(1) / 2;  // ATen's SiLU: its vectorised exp is far faster than a scalar loop
    torch::Tensor m = at::silu(gu.narrow(1, 0, inter)).mul_(gu.narrow(1, inter, inter));
    h.add_(linear(m, w[kDown], w[kDownPacked], OptT()));
  }
  int32_t* plens = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < n; ++b) plens[b] += 1;
  torch::Tensor out = torch::empty_like(h);
  rms_rows(h, norm_w, eps[L * 4], out);
  return out;
}

}  // namespace hrpo
