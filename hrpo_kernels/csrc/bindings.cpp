// The one torch-facing file: checks shapes / dtypes / devices (one-line errors), then hands
// raw pointers (and the current CUDA stream) to the CPU twins or the CUDA launchers.
// Build with -DHRPO_CPU_ONLY for the CPU-only extension (no CUDA headers at all).
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "decode_body_cpu.h"
#include "ops.h"
#include "philox.h"

#ifndef HRPO_CPU_ONLY
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops_cuda.h"
#endif
#ifdef HRPO_CPU_ONLY
#include "lm_head_cpu.h"
#endif

namespace {

using hrpo::DType;

#define HRPO_CHECK(cond, ...) TORCH_CHECK((cond), __VA_ARGS__)

void check_on(const torch::Tensor& t, const torch::Device& dev, const char* op, const char* name) {
  HRPO_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), ", expected ", dev);
}

void check_vec(const torch::Tensor& t, int64_t n, torch::ScalarType dt, const char* op, const char* name) {
  HRPO_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dt && t.is_contiguous(), op, ": ", name,
             " must be a contiguous (", n, ",) ", c10::toString(dt), " tensor, got ", t.sizes(), " ", t.scalar_type());
}

void check_scalar_i64(const torch::Tensor& t, const torch::Device& dev, const char* op, const char* name) {
  HRPO_CHECK(t.numel() == 1 && t.scalar_type() == torch::kInt64, op, ": ", name,
             " must be a one-element int64 tensor, got ", t.sizes(), " ", t.scalar_type());
  check_on(t, dev, op, name);
}

DType dtype_of(const torch::Tensor& t, const char* op, const char* name, bool allow_half) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return DType::kFloat32;
    case torch::kBFloat16:
      return DType::kBFloat16;
    case torch::kFloat16:
      if (allow_half) return DType::kFloat16;
      [[fallthrough]];
    default:
      HRPO_CHECK(false, op, ": ", name, " dtype ", t.scalar_type(), " is not supported");
  }
  return DType::kFloat32;
}

void topk_sample_mix(const torch::Tensor& logits, const torch::Tensor& embedding, int64_t k, double temperature,
                     bool greedy, const torch::Tensor& seed, const torch::Tensor& offset,
                     const std::optional<torch::Tensor>& row_ids, torch::Tensor tokens, torch::Tensor logprobs,
                     torch::Tensor h_hat, int64_t mode, double inv_tm, double inv_tau, double beta, double sigma,
                     double inv_logv, int64_t noise_key, const std::optional<torch::Tensor>& entropy,
                     double top_p, double mix_top_p) {
  const char* op = "topk_sample_mix";
  HRPO_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1, op,
             ": logits must be (B, V) fp32 with unit column stride, got ", logits.sizes(), " ", logits.scalar_type());
  const int64_t B = logits.size(0), V = logits.size(1);
  HRPO_CHECK(V > 0 && V < (int64_t(1) << 31), op, ": vocabulary size ", V, " out of range");
  HRPO_CHECK(embedding.dim() == 2 && embedding.size(0) >= V && embedding.stride(1) == 1, op,
             ": embedding must be (>= V, d) with unit column stride, got ", embedding.sizes(), " for V = ", V);
  const int64_t D = embedding.size(1);
  const DType edt = dtype_of(embedding, op, "embedding", true);
  HRPO_CHECK(k >= 1 && k <= hrpo::kMaxTopK, op, ": k must be in [1, ", hrpo::kMaxTopK, "], got ", k);
  HRPO_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  const auto dev = logits.device();
  check_on(embedding, dev, op, "embedding");
  HRPO_CHECK(seed.dim() == 1 && (seed.numel() == 1 || seed.numel() == B) && seed.scalar_type() == torch::kInt64,
             op, ": seed must be int64 of 1 or B = ", B, " elements, got ", seed.sizes(), " ", seed.scalar_type());
  check_on(seed, dev, op, "seed");
  check_scalar_i64(offset, dev, op, "offset");
  if (row_ids.has_value()) {
    check_on(*row_ids, dev, op, "row_ids");
    check_vec(*row_ids, B, torch::kInt64, op, "row_ids");
  }
  check_on(tokens, dev, op, "tokens");
  check_on(logprobs, dev, op, "logprobs");
  check_on(h_hat, dev, op, "h_hat");
  check_vec(tokens, B, torch::kInt64, op, "tokens");
  check_vec(logprobs, B, torch::kFloat32, op, "logprobs");
  HRPO_CHECK(h_hat.dim() == 2 && h_hat.size(0) == B && h_hat.size(1) == D && h_hat.stride(1) == 1 &&
                 h_hat.scalar_type() == torch::kFloat32,
             op, ": h_hat must be (B, d) fp32 with unit column stride, got ", h_hat.sizes(), " ", h_hat.scalar_type());
  hrpo::TopkArgs a;
  a.logits = logits.data_ptr<float>();
  a.ld_logits = logits.stride(0);
  a.embedding = embedding.data_ptr();
  a.ld_emb = embedding.stride(0);
  a.emb_dtype = edt;
  a.B = B;
  a.V = V;
  a.D = D;
  a.k = static_cast<int>(k);
  a.inv_t = static_cast<float>(1.0 / temperature);
  a.greedy = greedy;
  a.seed = seed.data_ptr<int64_t>();
  a.seed_stride = seed.numel() == 1 ? 0 : 1;
  a.offset = offset.data_ptr<int64_t>();
  a.row_ids = row_ids.has_value() ? row_ids->data_ptr<int64_t>() : nullptr;
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  a.h_hat = h_hat.data_ptr<float>();
  a.ld_h = h_hat.stride(0);
  HRPO_CHECK(mode >= 0 && mode <= 4, op, ": latent mode id must be in [0, 4], got ", mode);
  HRPO_CHECK(dev.is_cpu() || mode == 0, op, ": the CUDA kernel takes the hrpo latent mode only, got mode ", mode);
  a.mode = static_cast<int>(mode);
  a.inv_tm = static_cast<float>(inv_tm);
  a.inv_tau = static_cast<float>(inv_tau);
  a.beta = static_cast<float>(beta);
  a.sigma = static_cast<float>(sigma);
  a.inv_logv = static_cast<float>(inv_logv);
  a.noise_key = static_cast<uint64_t>(noise_key);
  if (entropy.has_value()) {
    HRPO_CHECK(dev.is_cpu(), op, ": the CUDA kernel writes no entropy (the Triton tail does)");
    check_on(*entropy, dev, op, "entropy");
    check_vec(*entropy, B, torch::kFloat32, op, "entropy");
    a.entropy = entropy->data_ptr<float>();
  }
  HRPO_CHECK(top_p > 0 && top_p <= 1 && mix_top_p > 0 && mix_top_p <= 1, op, ": top_p and mix_top_p must be in (0, 1], got ",
             top_p, " and ", mix_top_p);
  HRPO_CHECK(dev.is_cpu() || (top_p == 1 && mix_top_p == 1), op, ": the CUDA kernel cuts no nucleus, got top_p ", top_p,
             " and mix_top_p ", mix_top_p);
  a.top_p = static_cast<float>(top_p);
  a.mix_top_p = static_cast<float>(mix_top_p);
  if (B == 0) return;
  if (dev.is_cpu()) {
    hrpo::topk_sample_mix_cpu(a);
    return;
  }
#ifndef HRPO_CPU_ONLY
  HRPO_CHECK(dev.is_cuda(), op, ": unsupported device ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = hrpo::topk_sample_mix_cuda(a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  HRPO_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#else
  HRPO_CHECK(false, op, ": this build of the extension is CPU-only, got a tensor on ", dev);
#endif
}

void step_controller(const torch::Tensor& table, torch::Tensor state, torch::Tensor finished,
                     const torch::Tensor& tokens, const torch::Tensor& logprobs, const torch::Tensor& h_hat,
                     const torch::Tensor& eos, torch::Tensor t, torch::Tensor out_tokens, torch::Tensor out_logprobs,
                     torch::Tensor out_think, torch::Tensor out_mask, torch::Tensor latents, torch::Tensor step_tokens,
                     torch::Tensor step_think, torch::Tensor n_live, int64_t pad_id, int64_t max_new_tokens,
                     bool hybrid) {
  const char* op = "step_controller";
  HRPO_CHECK(table.dim() == 2 && table.is_contiguous() &&
                 (table.scalar_type() == torch::kInt64 || table.scalar_type() == torch::kInt32),
             op, ": table must be a contiguous (S + 1, V) int64/int32 tensor, got ", table.sizes(), " ",
             table.scalar_type());
  const auto dev = table.device();
  HRPO_CHECK(state.dim() == 1 && state.is_contiguous() &&
                 (state.scalar_type() == torch::kInt64 || state.scalar_type() == torch::kInt32),
             op, ": state must be a contiguous (B,) int64/int32 tensor, got ", state.sizes(), " ", state.scalar_type());
  const int64_t B = state.size(0);
  HRPO_CHECK(out_tokens.dim() == 2 && out_tokens.size(0) == B && out_tokens.is_contiguous() &&
                 out_tokens.scalar_type() == torch::kInt64,
             op, ": out_tokens must be a contiguous (B, T) int64 tensor, got ", out_tokens.sizes(), " ",
             out_tokens.scalar_type());
  const int64_t T = out_tokens.size(1);
  HRPO_CHECK(h_hat.dim() == 2 && h_hat.size(0) == B && h_hat.stride(1) == 1 && h_hat.scalar_type() == torch::kFloat32,
             op, ": h_hat must be (B, d) fp32 with unit column stride, got ", h_hat.sizes(), " ", h_hat.scalar_type());
  const int64_t D = h_hat.size(1);
  const auto check_bt = [&](const torch::Tensor& x, torch::ScalarType dt, const char* name) {
    HRPO_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T && x.is_contiguous() && x.scalar_type() == dt, op,
               ": ", name, " must be a contiguous (B, T) ", c10::toString(dt), " tensor, got ", x.sizes(), " ",
               x.scalar_type());
  };
  check_bt(out_logprobs, torch::kFloat32, "out_logprobs");
  check_bt(out_think, torch::kBool, "out_think");
  check_bt(out_mask, torch::kBool, "out_mask");
  HRPO_CHECK(latents.dim() == 3 && latents.size(0) == B && latents.size(1) == T && latents.size(2) == D &&
                 latents.is_contiguous(),
             op, ": latents must be a contiguous (B, T, d) tensor, got ", latents.sizes());
  const DType ldt = dtype_of(latents, op, "latents", false);
  check_vec(finished, B, torch::kBool, op, "finished");
  check_vec(tokens, B, torch::kInt64, op, "tokens");
  check_vec(logprobs, B, torch::kFloat32, op, "logprobs");
  check_vec(step_tokens, B, torch::kInt64, op, "step_tokens");
  check_vec(step_think, B, torch::kBool, op, "step_think");
  HRPO_CHECK(eos.dim() == 1 && eos.is_contiguous() && eos.scalar_type() == torch::kInt64, op,
             ": eos must be a contiguous 1-d int64 tensor, got ", eos.sizes(), " ", eos.scalar_type());
  check_scalar_i64(t, dev, op, "t");
  check_scalar_i64(n_live, dev, op, "n_live");
  for (const torch::Tensor* x : std::initializer_list<const torch::Tensor*>{&state, &finished, &tokens, &logprobs, &h_hat, &eos, &out_tokens, &out_logprobs, &out_think,
                        &out_mask, &latents, &step_tokens, &step_think}) {
    check_on(*x, dev, op, "every tensor argument");
  }
  hrpo::StepArgs a;
  a.table = table.data_ptr();
  a.table_i64 = table.scalar_type() == torch::kInt64;
  a.n_states = table.size(0);
  a.V = table.size(1);
  a.state = state.data_ptr();
  a.state_i64 = state.scalar_type() == torch::kInt64;
  a.finished = finished.data_ptr<bool>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  a.h_hat = h_hat.data_ptr<float>();
  a.ld_h = h_hat.stride(0);
  a.eos = eos.data_ptr<int64_t>();
  a.n_eos = eos.size(0);
  a.pad_id = pad_id;
  a.t = t.data_ptr<int64_t>();
  a.max_new_tokens = max_new_tokens;
  a.hybrid = hybrid;
  a.B = B;
  a.T = T;
  a.D = D;
  a.out_tokens = out_tokens.data_ptr<int64_t>();
  a.out_logprobs = out_logprobs.data_ptr<float>();
  a.out_think = out_think.data_ptr<bool>();
  a.out_mask = out_mask.data_ptr<bool>();
  a.latents = latents.data_ptr();
  a.latent_dtype = ldt;
  a.step_tokens = step_tokens.data_ptr<int64_t>();
  a.step_think = step_think.data_ptr<bool>();
  a.n_live = n_live.data_ptr<int64_t>();
  if (dev.is_cpu()) {
    hrpo::step_controller_cpu(a);
    return;
  }
#ifndef HRPO_CPU_ONLY
  HRPO_CHECK(dev.is_cuda(), op, ": unsupported device ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = hrpo::step_controller_cuda(a, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  HRPO_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
#else
  HRPO_CHECK(false, op, ": this build of the extension is CPU-only, got a tensor on ", dev);
#endif
}

void gated_blend_fwd(const torch::Tensor& e, const torch::Tensor& h, const torch::Tensor& lin,
                     const torch::Tensor& coef, const torch::Tensor& mask, torch::Tensor out, torch::Tensor a) {
  const char* op = "gated_blend_cpu";
  HRPO_CHECK(e.dim() == 2 && e.scalar_type() == torch::kFloat32 && e.is_contiguous() && e.device().is_cpu(), op,
             ": e must be a contiguous (B, d) fp32 CPU tensor, got ", e.sizes(), " ", e.scalar_type(), " on ", e.device());
  const int64_t B = e.size(0), D = e.size(1);
  const auto dev = e.device();
  HRPO_CHECK(h.sizes() == e.sizes() && h.is_contiguous(), op, ": h_hat must be contiguous ", e.sizes(), ", got ",
             h.sizes());
  const DType hdt = dtype_of(h, op, "h_hat", true);
  HRPO_CHECK(lin.dim() == 2 && lin.size(0) == B && lin.size(1) == 2 * D && lin.scalar_type() == torch::kFloat32 &&
                 lin.is_contiguous(), op, ": lin must be a contiguous (", B, ", ", 2 * D, ") fp32 tensor, got ",
             lin.sizes(), " ", lin.scalar_type());
  check_vec(coef, D, torch::kFloat32, op, "coef");
  check_vec(mask, B, torch::kBool, op, "mask");
  for (const torch::Tensor* t : {&out, &a})
    HRPO_CHECK(t->sizes() == e.sizes() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(), op,
               ": outputs must be contiguous ", e.sizes(), " fp32 tensors");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&h, &lin, &coef, &mask, &out, &a})
    check_on(*t, dev, op, "every tensor");
  hrpo::GateArgs g{e.data_ptr<float>(), h.data_ptr(), hdt, lin.data_ptr<float>(), coef.data_ptr<float>(),
                   mask.data_ptr<bool>(), B, D, out.data_ptr<float>(), a.data_ptr<float>()};
  hrpo::gated_blend_cpu(g);
}

std::vector<int64_t> philox4x32_10(const std::vector<int64_t>& ctr, const std::vector<int64_t>& key) {
  HRPO_CHECK(ctr.size() == 4 && key.size() == 2, "philox4x32_10: needs 4 counter words and 2 key words");
  const auto w = [](int64_t v) { return static_cast<uint32_t>(v); };
  const hrpo::U32x4 r = hrpo::philox4x32_10(w(ctr[0]), w(ctr[1]), w(ctr[2]), w(ctr[3]), w(key[0]), w(key[1]));
  return {r.v[0], r.v[1], r.v[2], r.v[3]};
}

double philox_uniform(int64_t seed, int64_t counter) {
  return hrpo::philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(counter));
}

bool has_cuda() {
#ifdef HRPO_CPU_ONLY
  return false;
#else
  return true;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "HRPO hot-loop ops: top-k sample + latent mixture, rollout step controller, CPU gate and decoder body";
  m.def("topk_sample_mix", &topk_sample_mix, "top-k race sample, full-vocab logprob and h_hat (outputs in place)");
  m.def("step_controller", &step_controller, "one rollout bookkeeping step (buffers updated in place)");
  m.def("gated_blend_cpu", &gated_blend_fwd, "gated_blend forward epilogue on the CPU (outputs in place)");
  // Without the GIL: a server runs the model on a worker thread while its event loop streams.
  m.def("decode_body_cpu", &hrpo::decode_body_cpu, "the engine's decoder body for one decode step (CPU, fp32 or bf16)",
        py::call_guard<py::gil_scoped_release>());
#ifdef HRPO_CPU_ONLY  // lm_head_cpu.cpp is a CPU-only build's (_ext.CPU_ONLY_SOURCES)
  m.def("lm_head_bf16_supported", &hrpo::lm_head_bf16_supported, "whether ATen's bf16 brgemm runs on this CPU");
  m.def("lm_head_pack_bf16", &hrpo::lm_head_pack_bf16, "a bf16 lm-head weight packed for lm_head_bf16");
  m.def("lm_head_bf16", &hrpo::lm_head_bf16, "fp32 logits of bf16 hidden states (CPU, bf16 brgemm)",
        py::call_guard<py::gil_scoped_release>());
#endif
  m.def("philox4x32_10", &philox4x32_10, "Philox4x32-10 of (4 counter words, 2 key words)");
  m.def("philox_uniform", &philox_uniform, "the race uniform u(seed, counter) of the kernels");
  m.def("has_cuda", &has_cuda, "whether this build holds the CUDA kernels");
}
