"""HRPO: hybrid reasoning policy optimization (arXiv 2505.18454).

`hrpo.generate(...)` and `hrpo.LLM` are hrpo.serve's Python API, loaded on first use (a PEP 562
module __getattr__) so that `import hrpo` stays light: no torch, no model, no HTTP stack."""

__version__ = "0.1.0"

_SERVE_API = ("LLM", "Completion", "generate")


def __getattr__(name: str):
    if name in _SERVE_API:
        import hrpo.serve

        return getattr(hrpo.serve, name)
    raise AttributeError(f"module 'hrpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SERVE_API])
