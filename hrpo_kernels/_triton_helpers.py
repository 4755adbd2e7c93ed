"""@triton.jit helpers that more than one op's kernels call, defined at the first launch like
the kernels themselves (so `import hrpo_kernels` works without triton, and a TRITON_INTERPRET
set late still applies). A kernel module binds each helper to a module global of its own,
where Triton looks up the names a kernel calls."""
from __future__ import annotations

triton = None  # module globals: the helpers' bodies find tl here
tl = None
_HELPERS: dict | None = None


def helpers() -> dict:
    global triton, tl, _HELPERS
    if _HELPERS is not None:
        return _HELPERS
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl

    @triton.jit
    def dot_p(p, x, FP32_DOT: tl.constexpr):
        """p (M, K) fp32 @ x (K, N): exact fp32 products when FP32_DOT, else p split into
        two halves of x's 16-bit dtype (tensor-core speed, ~16-bit mantissa for p)."""
        if FP32_DOT:
            out = tl.dot(p, x.to(tl.float32), input_precision="ieee")
        else:
            p_hi = p.to(x.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(x.dtype)
            out = tl.dot(p_hi, x) + tl.dot(p_lo, x)
        return out

    _HELPERS = dict(dot_p=dot_p)
    return _HELPERS
