"""The lazy Triton setup every op file shares, and the @triton.jit helpers more than one op's
kernels call.

Kernels are defined at their first launch, not at import, so that `import hrpo_kernels` works
without triton and a TRITON_INTERPRET set late (by a test module) still applies. Triton looks
up the names a kernel body uses (`tl`, `triton`, the shared helpers) among its module's
globals, so `lazy_kernels` binds them there before it defines the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

triton = tl = philox_uniform = None  # module globals: the shared helpers' bodies find them here
_SHARED: dict = {}


def _import_triton(namespace: dict) -> None:
    import triton as _triton
    import triton.language as _tl

    namespace.update(triton=_triton, tl=_tl)


def _shared() -> dict:
    """The shared @triton.jit helpers, by the name a kernel calls them with."""
    if _SHARED:
        return _SHARED
    _import_triton(globals())

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

    @triton.jit
    def philox_uniform(seed, ctr):
        """philox_uniform(seed, ctr) of hrpo_kernels/philox.py: tl.randint is Philox4x32-10 with
        counter words (ctr lo, ctr hi, 0, 0), key (seed lo, seed hi), and returns word 0."""
        r0 = tl.randint(seed, ctr).to(tl.uint32, bitcast=True)  # logical shift below
        return ((r0 >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # exact, in (0, 1)

    globals()["philox_uniform"] = philox_uniform  # where gaussian's body finds it

    @triton.jit
    def gaussian(key, ctr):
        """A standard normal by Box-Muller on philox_uniform(key, ctr) and (key + 1, ctr), as
        latent_input.gaussian_noise."""
        u1 = philox_uniform(key, ctr)
        u2 = philox_uniform(key + 1, ctr)
        return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)

    _SHARED.update(dot_p=dot_p, philox_uniform=philox_uniform, gaussian=gaussian)
    return _SHARED


def lazy_kernels(namespace: dict, define: Callable[[], dict]) -> Callable[[], dict]:
    """A function returning `define()`'s kernels, run once at the first call after binding
    triton, tl and the shared helpers (dot_p, philox_uniform, gaussian) into `namespace` (the op module's
    globals()). Usage: `_kernels = lazy_kernels(globals(), _define_kernels)`."""
    kernels: dict = {}

    def get() -> dict:
        if not kernels:
            _import_triton(namespace)
            namespace.update(_shared())
            kernels.update(define())
        return kernels

    return get
