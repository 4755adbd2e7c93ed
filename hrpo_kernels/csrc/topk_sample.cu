// topk_sample_mix on CUDA: one 512-thread block per row.
//
//  1. one pass over the row (float4 loads): online logsumexp of x/T, the greedy argmax and a
//     2048-bin histogram of the top 11 bits of each logit's order-preserving key;
//  2. radix select of the k-th largest key, 11 + 11 + 10 bits. As soon as the logits that
//     share the current key prefix fit in shared memory (<= kCap), one more pass copies them
//     there (and the logits above the prefix straight into the selection); the remaining
//     digits are resolved in shared memory. Otherwise the digit passes re-read the row;
//  3. the selection = keys above the threshold + the lowest-index keys equal to it, sorted by
//     token id (bitonic), so the set and its order do not depend on thread scheduling;
//  4. softmax over the k logits, Philox race argmax_j (x_j/T - log(-log u_j)) with
//     u_j = philox_uniform(seed, offset + row_id * V + tok_j) (row_id = row_ids[row], or row),
//     logprob of the chosen token over the full vocabulary, h_hat = sum_j (p_j/||p||) E[tok_j]
//     with 16-byte loads along d.
// The CPU twin (topk_sample_cpu.cpp) implements the same rule with the same float formulas.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops_cuda.h"
#include "philox.h"

namespace hrpo {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;
constexpr int kCap = 4096;
constexpr unsigned kFull = 0xffffffffu;

struct TopkSmem {
  uint32_t hist[kBins];
  uint32_t cand_key[kCap];
  int32_t cand_idx[kCap];
  int32_t sel_idx[kMaxTopK];
  float sel_w[kMaxTopK];
  float red_a[kWarps];
  float red_b[kWarps];
  int32_t red_i[kWarps];
  uint32_t scan[kWarps];
  float lse;
  float f_out;
  int32_t i_out;
  uint32_t digit;
  uint32_t above;
  uint32_t scan_total;
  int32_t n_cand;
  int32_t n_sel;
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == neg_inf()) return;
  if (m == neg_inf()) {
    m = m2;
    s = s2;
  } else if (m2 > m) {
    s = s * __expf(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * __expf(m2 - m);
  }
}

// (value, index) argmax, ties to the lower index.
__device__ __forceinline__ void arg_merge(float& v, int32_t& i, float v2, int32_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

__device__ float block_sum(float v, TopkSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (lane == 0) sm.red_a[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sm.red_a[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    if (lane == 0) sm.f_out = v;
  }
  __syncthreads();
  const float r = sm.f_out;
  __syncthreads();
  return r;
}

__device__ float block_max(float v, TopkSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if (lane == 0) sm.red_a[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sm.red_a[lane] : neg_inf();
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    if (lane == 0) sm.f_out = v;
  }
  __syncthreads();
  const float r = sm.f_out;
  __syncthreads();
  return r;
}

// Block argmax of (v, i), ties to the lower index; every thread gets the winning index
// (and its value in *v_out).
__device__ int32_t block_argmax(float v, int32_t i, TopkSmem& sm, float* v_out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(kFull, v, o);
    const int32_t i2 = __shfl_xor_sync(kFull, i, o);
    arg_merge(v, i, v2, i2);
  }
  if (lane == 0) {
    sm.red_a[warp] = v;
    sm.red_i[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? sm.red_a[lane] : neg_inf();
    i = lane < kWarps ? sm.red_i[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float v2 = __shfl_xor_sync(kFull, v, o);
      const int32_t i2 = __shfl_xor_sync(kFull, i, o);
      arg_merge(v, i, v2, i2);
    }
    if (lane == 0) {
      sm.f_out = v;
      sm.i_out = i;
    }
  }
  __syncthreads();
  const int32_t r = sm.i_out;
  if (v_out) *v_out = sm.f_out;
  __syncthreads();
  return r;
}

// Exclusive prefix sum over threads in thread order; *total gets the block total.
__device__ uint32_t block_exclusive_scan(uint32_t v, TopkSmem& sm, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(kFull, inc, o);
    if (lane >= o) inc += n;
  }
  if (lane == 31) sm.scan[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < kWarps ? sm.scan[lane] : 0u;
    uint32_t winc = w;
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t n = __shfl_up_sync(kFull, winc, o);
      if (lane >= o) winc += n;
    }
    if (lane < kWarps) sm.scan[lane] = winc - w;  // exclusive over warps
    if (lane == kWarps - 1) sm.scan_total = winc;
  }
  __syncthreads();
  const uint32_t r = sm.scan[warp] + inc - v;
  *total = sm.scan_total;
  __syncthreads();
  return r;
}

// Among hist[0..nbins) find the digit d holding the k_rem-th largest element (counting from
// the highest bin): sets sm.digit = d, sm.above = elements in bins above d.
__device__ void find_digit(TopkSmem& sm, int nbins, uint32_t k_rem) {
  const int per = nbins / kThreads;  // 4 or 2
  const int hi = nbins - threadIdx.x * per;  // this thread's bins: [hi - per, hi), scanned downwards
  uint32_t c = 0;
  for (int b = hi - 1; b >= hi - per; --b) c += sm.hist[b];
  uint32_t total;
  const uint32_t excl = block_exclusive_scan(c, sm, &total);
  if (excl < k_rem && k_rem <= excl + c) {
    uint32_t cum = excl;
    for (int b = hi - 1; b >= hi - per; --b) {
      const uint32_t h = sm.hist[b];
      if (cum + h >= k_rem) {
        sm.digit = static_cast<uint32_t>(b);
        sm.above = cum;
        break;
      }
      cum += h;
    }
  }
  __syncthreads();
}

// Calls f(index, value) on this thread's share of the row, in increasing index order.
template <class F>
__device__ __forceinline__ void for_each_logit(const float* __restrict__ x, int32_t V, F&& f) {
  int32_t start = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15u) == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int32_t n4 = V >> 2;
    for (int32_t i = threadIdx.x; i < n4; i += kThreads) {
      const float4 q = __ldg(x4 + i);
      f(4 * i, q.x);
      f(4 * i + 1, q.y);
      f(4 * i + 2, q.z);
      f(4 * i + 3, q.w);
    }
    start = n4 << 2;
  }
  for (int32_t i = start + threadIdx.x; i < V; i += kThreads) f(i, __ldg(x + i));
}

__device__ __forceinline__ uint32_t key_of(float v) { return float_key(__float_as_uint(v)); }

template <class T>
struct Vec16;  // 16 bytes of T unpacked to float
template <>
struct Vec16<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void load(const float* p, float* out) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = q.x;
    out[1] = q.y;
    out[2] = q.z;
    out[3] = q.w;
  }
};
template <>
struct Vec16<uint16_t> {  // bf16 bits
  static constexpr int N = 8;
  __device__ __forceinline__ static void load(const uint16_t* p, float* out) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
struct Half16 {  // fp16
  static constexpr int N = 8;
  __device__ __forceinline__ static void load(const __half* p, float* out) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

__device__ __forceinline__ float scalar_to_float(float v) { return v; }
__device__ __forceinline__ float scalar_to_float(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
__device__ __forceinline__ float scalar_to_float(__half v) { return __half2float(v); }

// h[c] = sum_j w_j E[sel_j, c]; T the storage type, L its 16-byte loader.
template <class T, class L>
__device__ void mix_rows(const T* __restrict__ E, int64_t ld, int32_t D, int k, const TopkSmem& sm,
                         float* __restrict__ h) {
  constexpr int N = L::N;
  const bool vec = (D % N == 0) && (ld % N == 0) && ((reinterpret_cast<uintptr_t>(E) & 15u) == 0);
  if (vec) {
    const int32_t chunks = D / N;
    for (int32_t c = threadIdx.x; c < chunks; c += kThreads) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int j = 0; j < k; ++j) {
        float e[N];
        L::load(E + static_cast<int64_t>(sm.sel_idx[j]) * ld + static_cast<int64_t>(c) * N, e);
        const float w = sm.sel_w[j];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += w * e[i];
      }
#pragma unroll
      for (int i = 0; i < N; ++i) h[c * N + i] = acc[i];
    }
  } else {
    for (int32_t c = threadIdx.x; c < D; c += kThreads) {
      float acc = 0.f;
      for (int j = 0; j < k; ++j) acc += sm.sel_w[j] * scalar_to_float(E[static_cast<int64_t>(sm.sel_idx[j]) * ld + c]);
      h[c] = acc;
    }
  }
}

__global__ void __launch_bounds__(kThreads) topk_sample_mix_kernel(TopkArgs a) {
  __shared__ TopkSmem sm;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int32_t V = static_cast<int32_t>(a.V);
  const int k = a.k < V ? a.k : V;
  const float inv_t = a.inv_t;
  const float* __restrict__ x = a.logits + row * a.ld_logits;

  for (int i = tid; i < kBins; i += kThreads) sm.hist[i] = 0u;
  if (tid == 0) {
    sm.n_cand = 0;
    sm.n_sel = 0;
  }
  __syncthreads();

  // ---- pass 1: logsumexp, greedy argmax, top-digit histogram
  float m = neg_inf(), s = 0.f, gv = neg_inf();
  int32_t gi = INT32_MAX;
  for_each_logit(x, V, [&](int32_t i, float xv) {
    if (xv > gv || gi == INT32_MAX) {  // the first element counts even at -inf
      gv = xv;
      gi = i;
    }
    const float xs = __fmul_rn(xv, inv_t);
    if (xs != neg_inf()) {
      if (xs > m) {
        s = s * __expf(m - xs) + 1.f;
        m = xs;
      } else {
        s += __expf(xs - m);
      }
    }
    atomicAdd(&sm.hist[key_of(xv) >> 21], 1u);
  });
  {
    const int lane = tid & 31, warp = tid >> 5;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFull, m, o);
      const float s2 = __shfl_xor_sync(kFull, s, o);
      lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
      sm.red_a[warp] = m;
      sm.red_b[warp] = s;
    }
    __syncthreads();
    if (tid == 0) {
      float mm = neg_inf(), ss = 0.f;
      for (int w = 0; w < kWarps; ++w) lse_merge(mm, ss, sm.red_a[w], sm.red_b[w]);
      sm.lse = mm + logf(ss);
    }
    __syncthreads();
  }
  const float lse = sm.lse;
  const int32_t greedy_tok = block_argmax(gv, gi, sm, nullptr);

  // ---- radix select of the k-th largest key
  uint32_t prefix = 0u, mask = 0u, count_gt = 0u, eq = 0u;
  bool in_smem = false;
  int32_t n_cand = 0;
  for (int p = 0; p < 3; ++p) {
    const int shift = p == 0 ? 21 : (p == 1 ? 10 : 0);
    const int nbins = p == 2 ? 1024 : 2048;
    const uint32_t dmask = static_cast<uint32_t>(nbins - 1);
    if (p > 0) {
      for (int i = tid; i < nbins; i += kThreads) sm.hist[i] = 0u;
      __syncthreads();
      if (in_smem) {
        for (int32_t i = tid; i < n_cand; i += kThreads) {
          const uint32_t key = sm.cand_key[i];
          if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & dmask], 1u);
        }
      } else {
        for_each_logit(x, V, [&](int32_t, float xv) {
          const uint32_t key = key_of(xv);
          if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & dmask], 1u);
        });
      }
      __syncthreads();
    }
    find_digit(sm, nbins, static_cast<uint32_t>(k) - count_gt);
    const uint32_t d = sm.digit;
    count_gt += sm.above;
    eq = sm.hist[d];
    prefix |= d << shift;
    mask |= dmask << shift;
    __syncthreads();
    if (!in_smem && p < 2 && eq <= static_cast<uint32_t>(kCap)) {
      for_each_logit(x, V, [&](int32_t i, float xv) {
        const uint32_t key = key_of(xv);
        const uint32_t km = key & mask;
        if (km > prefix) {
          sm.sel_idx[atomicAdd(&sm.n_sel, 1)] = i;
        } else if (km == prefix) {
          const int32_t pos = atomicAdd(&sm.n_cand, 1);
          sm.cand_key[pos] = key;
          sm.cand_idx[pos] = i;
        }
      });
      __syncthreads();
      in_smem = true;
      n_cand = sm.n_cand;
    }
  }
  // prefix is now the threshold key: count_gt keys above it, eq equal to it, need of them taken
  const uint32_t thr = prefix;
  const uint32_t need = static_cast<uint32_t>(k) - count_gt;
  const bool take_all_eq = eq == need;
  if (in_smem) {
    for (int32_t i = tid; i < n_cand; i += kThreads) {
      const uint32_t key = sm.cand_key[i];
      if (key > thr || (take_all_eq && key == thr)) sm.sel_idx[atomicAdd(&sm.n_sel, 1)] = sm.cand_idx[i];
    }
  } else {
    for_each_logit(x, V, [&](int32_t i, float xv) {
      const uint32_t key = key_of(xv);
      if (key > thr || (take_all_eq && key == thr)) sm.sel_idx[atomicAdd(&sm.n_sel, 1)] = i;
    });
  }
  __syncthreads();
  if (!take_all_eq) {  // true ties at the threshold: the lowest indices, in index order
    uint32_t taken = 0;
    for (int32_t base = 0; base < V && taken < need; base += kThreads) {
      const int32_t i = base + tid;
      const uint32_t flag = (i < V && key_of(__ldg(x + i)) == thr) ? 1u : 0u;
      uint32_t total;
      const uint32_t rank = block_exclusive_scan(flag, sm, &total);
      if (flag && taken + rank < need) sm.sel_idx[count_gt + taken + rank] = i;
      taken += total;
    }
    __syncthreads();
  }

  // ---- sort the selection by token id (bitonic over kMaxTopK slots)
  for (int i = tid + k; i < kMaxTopK; i += kThreads) sm.sel_idx[i] = INT32_MAX;
  __syncthreads();
  for (int size = 2; size <= kMaxTopK; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (tid < kMaxTopK / 2) {
        const int lo = 2 * tid - (tid & (stride - 1));
        const int hi = lo + stride;
        const bool up = (lo & size) == 0;
        const int32_t a0 = sm.sel_idx[lo], a1 = sm.sel_idx[hi];
        if ((a0 > a1) == up) {
          sm.sel_idx[lo] = a1;
          sm.sel_idx[hi] = a0;
        }
      }
      __syncthreads();
    }
  }

  // ---- softmax over the k, race, logprob, weights
  const bool mine = tid < k;
  const int32_t my_tok = mine ? sm.sel_idx[tid] : INT32_MAX;
  const float sv = mine ? __fmul_rn(__ldg(x + my_tok), inv_t) : neg_inf();
  const float smax = block_max(sv, sm);
  const float pe = mine ? expf(sv - smax) : 0.f;
  const float psum = block_sum(pe, sm);
  const float p = pe / psum;
  const float sq = block_sum(p * p, sm);
  if (mine) sm.sel_w[tid] = p * (1.f / sqrtf(sq));
  int32_t tok;
  if (a.greedy) {
    tok = greedy_tok;
  } else {
    float score = neg_inf();
    if (mine) {
      const uint64_t rid = static_cast<uint64_t>(a.row_ids ? a.row_ids[row] : row);
      const uint64_t ctr =
          static_cast<uint64_t>(*a.offset) + rid * static_cast<uint64_t>(V) + static_cast<uint64_t>(my_tok);
      const float u = philox_uniform(static_cast<uint64_t>(a.seed[row * a.seed_stride]), ctr);
      score = __fsub_rn(sv, logf(-logf(u)));
    }
    tok = block_argmax(score, my_tok, sm, nullptr);
  }
  if (tid == 0) {
    a.tokens[row] = tok;
    a.logprobs[row] = __fmul_rn(__ldg(x + tok), inv_t) - lse;
  }
  __syncthreads();  // sel_w visible

  // ---- h_hat
  float* h = a.h_hat + row * a.ld_h;
  const int32_t D = static_cast<int32_t>(a.D);
  switch (a.emb_dtype) {
    case DType::kFloat32:
      mix_rows<float, Vec16<float>>(static_cast<const float*>(a.embedding), a.ld_emb, D, k, sm, h);
      break;
    case DType::kBFloat16:
      mix_rows<uint16_t, Vec16<uint16_t>>(static_cast<const uint16_t*>(a.embedding), a.ld_emb, D, k, sm, h);
      break;
    case DType::kFloat16:
      mix_rows<__half, Half16>(static_cast<const __half*>(a.embedding), a.ld_emb, D, k, sm, h);
      break;
  }
}

}  // namespace

cudaError_t topk_sample_mix_cuda(const TopkArgs& a, cudaStream_t stream) {
  if (a.B > 0) topk_sample_mix_kernel<<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace hrpo
