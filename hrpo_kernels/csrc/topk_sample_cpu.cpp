// CPU twin of topk_sample_mix (topk_sample.cu): the same selection rule, the same Philox
// noise and the same race score, so that (seed, offset, row_ids) give the same tokens.
//
// Selection: with thr the k-th largest float key of the row, the selected set is every
// logit with key > thr plus the lowest-index logits with key == thr until k are taken;
// it is kept in increasing token order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

}  // namespace

void topk_sample_mix_cpu(const TopkArgs& a) {
  const int64_t V = a.V, D = a.D;
  const int k = static_cast<int>(std::min<int64_t>(a.k, V));
  const uint64_t seed = static_cast<uint64_t>(*a.seed);
  const uint64_t offset = static_cast<uint64_t>(*a.offset);
  // Rows are independent: split them over OpenMP threads, each with its own scratch.
#pragma omp parallel if (a.B > 1)
  {
    std::vector<uint32_t> keys(V), work(V);
    std::vector<int64_t> sel(k);
    std::vector<float> w(k);
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
      // softmax over the selected, the race, the weights p / ||p||
      float smax = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < k; ++j) smax = std::max(smax, x[sel[j]] * a.inv_t);
      float psum = 0.f;
      for (int j = 0; j < k; ++j) {
        w[j] = std::exp(x[sel[j]] * a.inv_t - smax);
        psum += w[j];
      }
      float sq = 0.f;
      for (int j = 0; j < k; ++j) {
        w[j] /= psum;
        sq += w[j] * w[j];
      }
      const float inv_norm = 1.f / std::sqrt(sq);
      int64_t tok;
      if (a.greedy) {
        tok = g_idx;
      } else {
        const uint64_t base = offset + static_cast<uint64_t>(a.row_ids ? a.row_ids[r] : r) * static_cast<uint64_t>(V);
        float best = -std::numeric_limits<float>::infinity();
        tok = sel[0];
        for (int j = 0; j < k; ++j) {
          const float u = philox_uniform(seed, base + static_cast<uint64_t>(sel[j]));
          const float scaled = x[sel[j]] * a.inv_t;
          const float score = scaled - std::log(-std::log(u));
          if (score > best) {  // strict: ties keep the lower token
            best = score;
            tok = sel[j];
          }
        }
      }
      a.tokens[r] = tok;
      a.logprobs[r] = x[tok] * a.inv_t - lse;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int j = 0; j < k; ++j) {
        const float wj = w[j] * inv_norm;
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
    }
  }
}

}  // namespace hrpo
