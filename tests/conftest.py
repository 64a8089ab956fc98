"""Shared fixtures, tolerances and helpers for the mlx-fused-losses tests.

Tolerances
----------
All comparisons against the float64 reference use ``assert_close`` with the
per-dtype tolerances in ``TOL`` (stated once, here, and never loosened per
test).  The reference is always computed from the *same rounded* low
precision inputs the package sees, so the only expected errors are

* fp32 internal arithmetic (the package computes in fp32 internally), which
  for a backward-stable algorithm is bounded by a few fp32 ulps of the
  magnitude of the inputs involved: ``SCALE_ULPS * eps32 * scale``, where
  ``scale`` is the (per element / per row) input magnitude supplied by the
  test (0 by default), and
* rounding of the result to the output dtype: ``rtol * |ref| + atol``.
"""

from __future__ import annotations

import os
import zlib

import mlx.core as mx
import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "fast",
        max_examples=int(os.environ.get("FL_HYPOTHESIS_EXAMPLES", "100")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow,
                               HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
except ImportError:  # pragma: no cover
    pass

def pytest_configure(config):
    """The suite tests the installed package: without it, the run fails
    (it used to skip most tests and exit 0)."""
    try:
        import mlx_fused_losses  # noqa: F401
    except ImportError as err:
        raise pytest.UsageError(
            f"mlx_fused_losses cannot be imported ({err}); install it first "
            "(pip install -e . --no-build-isolation, or the wheel) and rerun"
        ) from err


# The one skip reason for every test that needs the harness compiler.
CLANG_MISSING = "clang++-19 not found (apt-get install clang-19, or set MH_CLANGXX)"

# The static MSL check's AST rules read clang's AST through libclang's Python
# bindings (the `clang` package of the test extra; Debian's libclang1-19 comes with
# clang-19). Without them the static check cannot run: its tests skip, saying so.
def _libclang_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("clang") is None:
        return "libclang bindings missing: pip install clang==19.1.7 (the test extra)"
    return None


needs_libclang = pytest.mark.skipif(_libclang_missing() is not None,
                                    reason=str(_libclang_missing()))

# Tests run on the CPU build of MLX.
mx.set_default_device(mx.cpu)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = {mx.float32: "fp32", mx.float16: "fp16", mx.bfloat16: "bf16"}

# (rtol, atol) for a result *stored* in the given dtype.
TOL = {
    mx.float32: (2e-5, 2e-6),
    mx.float16: (2e-3, 1e-5),
    mx.bfloat16: (1.6e-2, 1e-5),
}
EPS32 = float(np.finfo(np.float32).eps)
SCALE_ULPS = 8.0


def dtype_id(dt):
    return DTYPE_IDS[dt]


def to_np(a) -> np.ndarray:
    """mx.array -> float64 (or int64) NumPy array."""
    if isinstance(a, mx.array):
        if mx.issubdtype(a.dtype, mx.floating):
            return np.array(a.astype(mx.float32), dtype=np.float64)
        return np.array(a).astype(np.int64)
    return np.asarray(a)


def to_mx(a, dtype=mx.float32):
    """NumPy -> mx.array of ``dtype`` plus the float64 copy of the rounded
    values (what the reference must be computed from)."""
    x = mx.array(np.asarray(a, dtype=np.float32)).astype(dtype)
    return x, to_np(x)


def tol(dtype):
    return TOL[dtype]


def assert_close(got, ref, dtype, scale=0.0, what="", mag=None):
    """|got - ref| <= atol + rtol*|ref| + SCALE_ULPS*eps32*scale, elementwise.

    ``mag`` replaces |ref| in the rtol term where the result is a sum of
    several values each rounded to ``dtype`` (pass the sum of their
    magnitudes).

    NaN/inf in ``ref`` must be matched exactly (same positions, same sign)."""
    g = to_np(got) if isinstance(got, mx.array) else np.asarray(got, np.float64)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != expected {r.shape}"
    rtol, atol = TOL[dtype]
    # a finite exact value outside the output dtype's range is stored as inf
    big = np.isfinite(r) & (np.abs(r) > float(np.finfo(np.float32).max)
                            if dtype != mx.float16 else
                            np.isfinite(r) & (np.abs(r) >= 65520.0))
    r = np.where(big, np.copysign(np.inf, r), r)
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    assert np.array_equal(nan_r, nan_g), (
        f"{what}: NaN mismatch at {np.argwhere(nan_r != nan_g)[:5].tolist()}"
        f" got={g[nan_r != nan_g][:5]} expected={r[nan_r != nan_g][:5]}")
    inf_r = np.isinf(r)
    assert np.array_equal(np.where(inf_r, r, 0), np.where(np.isinf(g), g, 0)), (
        f"{what}: inf mismatch got={g[inf_r | np.isinf(g)][:5]} "
        f"expected={r[inf_r | np.isinf(g)][:5]}")
    fin = ~(nan_r | inf_r)
    rmag = np.abs(r) if mag is None else np.maximum(np.abs(r), np.asarray(mag))
    bound = atol + rtol * rmag + SCALE_ULPS * EPS32 * np.asarray(scale)
    bound = np.broadcast_to(bound, r.shape)
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        err = np.abs(g - r)
    bad = fin & ~(err <= bound)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        det = ", ".join(
            f"{tuple(int(v) for v in i)}: got {g[tuple(i)]!r} "
            f"expected {r[tuple(i)]!r}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{r.size} elements out of tolerance "
            f"({DTYPE_IDS[dtype]}, max err {err[fin].max():.3g}); {det}")


def row_scale(x64, axis=-1):
    """Per-row input magnitude max(1, max|finite x|) (loss-shaped)."""
    a = np.where(np.isfinite(x64), np.abs(x64), 0.0)
    return np.maximum(1.0, a.max(axis=axis))


def row_scale_like(x64, axis=-1):
    """Same as row_scale but broadcast back to the logits' shape."""
    return np.expand_dims(row_scale(x64, axis), axis) * np.ones_like(x64)


def assert_raises_naming(exc_types, names, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (not evaluated) must raise one of
    ``exc_types`` whose message names one of ``names`` (case-insensitive;
    an argument name with ``_`` also matches written with spaces)."""
    if isinstance(names, str):
        names = [names]
    with pytest.raises(exc_types) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value).lower()
    variants = []
    for n in names:
        n = n.lower()
        variants += [n, n.replace("_", " ")]
    assert any(v in msg for v in variants), (
        f"message {str(ei.value)!r} does not name any of {names}")
    return ei.value


@pytest.fixture
def rng(request):
    # deterministic per test
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def fl():
    """The package under test (pytest_configure has checked it imports)."""
    import mlx_fused_losses

    return mlx_fused_losses
