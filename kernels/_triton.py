"""Triton (and its Gluon language) when installed; otherwise stand-ins, so that every kernel file still imports and its
plain-torch `*_ref` stays usable (the runtime runs the references on machines without Triton)."""

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # `pip install 'moeplace[kernels]'` brings it
    HAS_TRITON = False

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    # Only what module-level code touches: the decorator and the `tl.constexpr` annotations.
    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=None)

try:  # Gluon, Triton's explicit-layout language (Triton 3.5+): the Hopper kernel of grouped_gemm_gluon.py
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAS_GLUON = True
except ImportError:
    HAS_GLUON = False
    gluon = SimpleNamespace(jit=triton.jit, constexpr_function=lambda f: f)
    gl = SimpleNamespace(constexpr=None)


def require_triton() -> None:
    """Raise a readable error from a kernel wrapper called where Triton is missing."""
    if not HAS_TRITON:
        raise ImportError("moeplace.kernels needs Triton: pip install 'moeplace[kernels]' (or use the *_ref functions)")
