// CPU twin of topk_sample_mix (topk_sample.cu): the same selection rule, the same Philox
// noise and the same race score, so that (seed, offset, row_ids) give the same tokens.
//
// Selection: with thr the k-th largest float key of the row, the selected set is every
// logit with key > thr plus the lowest-index logits with key == thr until k are taken;
// it is kept in increasing token order.
//
// The third output is the latent mode's next input (a.mode; hrpo_kernels/latent_input.py is
// the definition): the mixture p = softmax(x) over the selected, x = logit / T_mix
// (gumbel-soft: (logit / T_mix + g) / tau, g the race's Gumbel noise), then hrpo p/||p||,
// soft p, moi (H p + (beta + 1 - H) onehot(token)) / (beta + 1), soft-noise p plus
// sigma * N(0, 1) by Box-Muller on the streams keyed by seed ^ noise_key and that + 1.
// a.entropy (optional) receives -sum p log p of that p (nats; gumbel-soft: of its weights).
//
// Nuclei (a.top_p, a.mix_top_p < 1; latent_input.nucleus): the sampler's is cut inside the
// selected (a stable sort of the k probabilities), the race and the mixture run over it; the
// mixture's own is cut from the mixture's p over those.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "load_float.h"
#include "ops.h"
#include "philox.h"

namespace hrpo {
namespace {

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// w[0..k) <- w / sum(w).
void renormalise(float* w, int k) {
  float sum = 0.f;
  for (int j = 0; j < k; ++j) sum += w[j];
  for (int j = 0; j < k; ++j) w[j] /= sum;
}

// w[0..k) <- softmax(w) (entries -inf get 0; at least one is finite).
void softmax_inplace(float* w, int k) {
  const float wmax = *std::max_element(w, w + k);
  for (int j = 0; j < k; ++j) w[j] = std::exp(w[j] - wmax);
  renormalise(w, k);
}

// w[0..k), a distribution over the selected (increasing token order), cut to its nucleus and
// renormalised (latent_input.nucleus): ranked by weight, the lower token first among equal
// ones, each kept while the mass ranked above it is < top_p. top_p 1: unchanged.
void cut_nucleus(float* w, int k, float top_p, std::vector<int>& order) {
  if (top_p >= 1.f) return;
  std::iota(order.begin(), order.begin() + k, 0);
  std::stable_sort(order.begin(), order.begin() + k, [w](int i, int j) { return w[i] > w[j]; });
  double before = 0.0;  // torch.cumsum's accumulation on the CPU
  int n = 0;
  while (n < k && static_cast<float>(before) < top_p) before += w[order[n++]];
  for (int j = n; j < k; ++j) w[order[j]] = 0.f;
  renormalise(w, k);
}

}  // namespace

void topk_sample_mix_cpu(const TopkArgs& a) {
  const int64_t V = a.V, D = a.D;
  const int k = static_cast<int>(std::min<int64_t>(a.k, V));
  const uint64_t offset = static_cast<uint64_t>(*a.offset);
  // Rows are independent: split them over OpenMP threads, each with its own scratch.
#pragma omp parallel if (a.B > 1)
  {
    std::vector<uint32_t> keys(V), work(V);
    std::vector<int64_t> sel(k);
    std::vector<float> w(k), g(k, 0.f), ps(k);
    std::vector<int> order(k);
    std::vector<float> acc(D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.B; ++r) {
      const float* x = a.logits + r * a.ld_logits;
      // logsumexp of x / T (online), greedy argmax of x (lowest index on ties)
      float m = -std::numeric_limits<float>::infinity(), s = 0.f;
      int64_t g_idx = 0;
      float g_val = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < V; ++v) {
        const float xv = x[v];
        if (xv > g_val) {
          g_val = xv;
          g_idx = v;
        }
        const float xs = xv * a.inv_t;
        if (xs == -std::numeric_limits<float>::infinity()) continue;
        if (xs > m) {
          s = s * std::exp(m - xs) + 1.f;
          m = xs;
        } else {
          s += std::exp(xs - m);
        }
      }
      const float lse = m + std::log(s);
      for (int64_t v = 0; v < V; ++v) keys[v] = float_key(bits_of(x[v]));
      // threshold: the k-th largest key
      work = keys;
      std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), [](uint32_t p, uint32_t q) { return p > q; });
      const uint32_t thr = work[k - 1];
      int64_t n_gt = 0;
      for (int64_t v = 0; v < V; ++v) n_gt += keys[v] > thr;
      int64_t need = k - n_gt;
      int n = 0;
      for (int64_t v = 0; v < V && n < k; ++v) {
        if (keys[v] > thr) {
          sel[n++] = v;
        } else if (keys[v] == thr && need > 0) {
          sel[n++] = v;
          --need;
        }
      }
      // the sampler's candidates: its nucleus among the selected (ps > 0), all when top_p is 1
      const float ninf = -std::numeric_limits<float>::infinity();
      if (a.top_p < 1.f) {
        for (int j = 0; j < k; ++j) ps[j] = x[sel[j]] * a.inv_t;
        softmax_inplace(ps.data(), k);
        cut_nucleus(ps.data(), k, a.top_p, order);
      }
      auto cand = [&](int j) { return a.top_p >= 1.f || ps[j] > 0.f; };
      // the race (Gumbel noise g, kept for gumbel-soft)
      const uint64_t seed = static_cast<uint64_t>(a.seed[r * a.seed_stride]);
      const uint64_t base = offset + static_cast<uint64_t>(a.row_ids ? a.row_ids[r] : r) * static_cast<uint64_t>(V);
      int64_t tok;
      if (a.greedy) {
        tok = g_idx;
      } else {
        float best = ninf;
        tok = sel[0];
        for (int j = 0; j < k; ++j) {
          g[j] = -std::log(-std::log(philox_uniform(seed, base + static_cast<uint64_t>(sel[j]))));
          const float score = x[sel[j]] * a.inv_t + g[j];
          if (cand(j) && score > best) {  // strict: ties keep the lower token
            best = score;
            tok = sel[j];
          }
        }
      }
      a.tokens[r] = tok;
      a.logprobs[r] = x[tok] * a.inv_t - lse;
      // the mixture p over the candidates and its own nucleus, then the mode's weights
      for (int j = 0; j < k; ++j) w[j] = cand(j) ? x[sel[j]] * a.inv_tm : ninf;
      softmax_inplace(w.data(), k);
      cut_nucleus(w.data(), k, a.mix_top_p, order);
      if (a.mode == 4) {  // gumbel-soft: softmax((x / T_mix + g) / tau) over p's support
        for (int j = 0; j < k; ++j) {
          const bool on = cand(j) && (a.mix_top_p >= 1.f || w[j] > 0.f);
          w[j] = on ? (x[sel[j]] * a.inv_tm + g[j]) * a.inv_tau : ninf;
        }
        softmax_inplace(w.data(), k);
      }
      float sq = 0.f, plogp = 0.f;
      for (int j = 0; j < k; ++j) {
        sq += w[j] * w[j];
        if (w[j] > 0.f) plogp += w[j] * std::log(w[j]);
      }
      float scale = 1.f, lam = 1.f;
      if (a.entropy) a.entropy[r] = -plogp;
      if (a.mode == 0) scale = 1.f / std::sqrt(sq);
      if (a.mode == 2) lam = scale = -plogp * a.inv_logv / (a.beta + 1.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int j = 0; j < k; ++j) {
        const float wj = w[j] * scale;
        const int64_t row_off = sel[j] * a.ld_emb;
        if (a.emb_dtype == DType::kFloat32) {  // a plain loop the compiler vectorises (same order per c)
          const float* e = static_cast<const float*>(a.embedding) + row_off;
          for (int64_t c = 0; c < D; ++c) acc[c] += wj * e[c];
        } else {
          for (int64_t c = 0; c < D; ++c) acc[c] += wj * load_float(a.embedding, a.emb_dtype, row_off + c);
        }
      }
      float* h = a.h_hat + r * a.ld_h;
      for (int64_t c = 0; c < D; ++c) h[c] = acc[c];
      if (a.mode == 2) {
        for (int64_t c = 0; c < D; ++c) h[c] += (1.f - lam) * load_float(a.embedding, a.emb_dtype, tok * a.ld_emb + c);
      } else if (a.mode == 3 && !a.greedy) {
        const uint64_t key = seed ^ a.noise_key;
        for (int64_t c = 0; c < D; ++c) {
          const float u1 = philox_uniform(key, base + static_cast<uint64_t>(c));
          const float u2 = philox_uniform(key + 1, base + static_cast<uint64_t>(c));
          h[c] += a.sigma * std::sqrt(-2.f * std::log(u1)) * std::cos(6.283185307179586f * u2);
        }
      }
    }
  }
}

}  // namespace hrpo
