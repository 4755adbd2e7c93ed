"""Compile every Triton kernel of hrpo_kernels for an H100 (sm_90) on a machine with no GPU,
at the paper's model shapes, in bf16 and fp32, and print one JSON line per kernel compiled.

Run as a script (tests/test_triton_sm90.py does, in a subprocess: TRITON_INTERPRET must be
unset before triton is imported, and the driver swap below is process-wide). A stand-in
driver names the target; every JIT launch is turned into a compile-only warm-up (Triton to
cubin through the bundled ptxas, nothing launched) and each autotune candidate is compiled
instead of timed. The ops' launchers run as on a GPU (interpreting() is false) around the
kernels; their outputs are never read. The interpreter runs fp32 dots only, so this is what
checks the bf16 tl.dot paths, tile shapes and shared memory of the real configurations.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import autotuner, driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90


class CompileOnlyDriver:
    target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


_jit_run = JITFunction.run
CONTEXT = {"case": ""}


def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    md = kernel.metadata
    print(
        json.dumps(
            dict(
                case=CONTEXT["case"],
                kernel=self.fn.__name__,
                warps=md.num_warps,
                stages=md.num_stages,
                shared=md.shared,
                ok=md.shared <= SHARED_LIMIT,
            )
        ),
        flush=True,
    )
    return kernel


def bench_by_compiling(self, *args, config, **meta):
    meta = {k: v for k, v in meta.items() if k not in ("grid", "warmup")}
    self.fn.run(*args, grid=(1,), warmup=True, **meta, **config.all_kwargs())
    return [0.0, 0.0, 0.0]


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_only
    autotuner.Autotuner._bench = bench_by_compiling

    from hrpo_kernels.decode_attention import decode_attention_triton
    from hrpo_kernels.gated_blend import gated_blend_triton
    from hrpo_kernels.latent_input import LatentParams
    from hrpo_kernels.sample_and_mix import full_vocab_fits, sample_and_mix_triton
    from hrpo_kernels.token_logprobs import token_logprobs_triton

    LATENT_VARIANTS = [
        LatentParams("soft", temperature=0.3),
        LatentParams("moi"),
        LatentParams("soft-noise"),
        LatentParams("gumbel-soft"),
    ]  # soft at its own temperature: the unshared softmax

    seed, offset = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    V, B = 4096, 8  # neither is a compile-time constant of any kernel
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).split(".")[-1]
        d = 1536  # d is a runtime argument of these two: one width covers every model
        CONTEXT["case"] = f"gated_blend {name}"
        e = torch.randn(B, d, dtype=dt, requires_grad=True)
        w = [torch.randn(d, d, requires_grad=True) for _ in range(2)]
        b = [torch.randn(d, requires_grad=True) for _ in range(2)]
        out, a = gated_blend_triton(
            e,
            torch.randn(B, d, dtype=dt),
            torch.ones(B, dtype=torch.bool),
            w[0],
            b[0],
            w[1],
            b[1],
            torch.randn(d, requires_grad=True),
        )
        (out.float().sum() + a.sum()).backward()
        CONTEXT["case"] = f"token_logprobs {name}"  # every autotune candidate, forward and backward
        W = torch.randn(V, d, dtype=dt, requires_grad=True)
        h = torch.randn(64, d, dtype=dt, requires_grad=True)
        token_logprobs_triton(h, W, torch.randint(0, V, (64,)), 0.7).sum().backward()
        for d in (1536, 2048, 3072):  # the tile widths follow d: Qwen2.5-1.5B, 3B / Llama-3.2-1B, Llama-3.2-3B
            W = torch.randn(V, d, dtype=dt)
            for top_k in (0, 50):
                CONTEXT["case"] = f"sample_and_mix {name} d{d} top_k{top_k}"
                args = (torch.randn(B, d, dtype=dt), W, W, 0.7, top_k)
                if top_k == 0 and not full_vocab_fits(d, W):  # must be refused, not launched
                    try:
                        sample_and_mix_triton(*args, seed=seed, offset=offset)
                    except NotImplementedError:
                        print(json.dumps(dict(case=CONTEXT["case"], refused=True)), flush=True)
                    continue
                sample_and_mix_triton(*args, seed=seed, offset=offset)
                if d == 2048:  # each latent mode is its own specialisation of the same tiles
                    for latent in LATENT_VARIANTS:
                        CONTEXT["case"] = f"sample_and_mix {name} d{d} top_k{top_k} {latent.mode}"
                        sample_and_mix_triton(*args, seed=seed, offset=offset, latent=latent)
        for H, Hkv, Dh in ((12, 2, 128), (16, 2, 128), (32, 8, 64), (24, 8, 128)):
            CONTEXT["case"] = f"decode_attention {name} H{H} Hkv{Hkv} Dh{Dh}"
            k = torch.randn(B, 512, Hkv, Dh, dtype=dt)
            decode_attention_triton(torch.randn(B, H, Dh, dtype=dt), k, k.clone(), torch.full((B,), 300), Dh**-0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
