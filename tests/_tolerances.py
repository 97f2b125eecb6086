"""Comparison tolerances, one place, per dtype.

Why these numbers
-----------------
float64 (unit roundoff 1.1e-16): a forward pass of T steps accumulates a few
roundings per gate per step plus the dot-product sums of length I + H; for the
sizes in the tests (T <= 30, I, H <= 32) the observed differences between two
correct implementations that sum in different orders are about 1e-14.
``rtol=1e-10`` leaves four orders of magnitude of headroom and still catches
any real error (a wrong gate, a missing term, an off-by-one step).

float32 (unit roundoff 6e-8): the same reasoning gives differences of about
1e-6 relative; the foundation issue asks for agreement to 1e-5 relative.  The
absolute floor ``atol`` covers values that pass through zero, where a relative
bound means nothing.

Finite differences: central differences in float64 with step 1e-6 have a
truncation error of order h^2 = 1e-12 and a rounding error of order
eps/h = 1e-10, so a relative error below 1e-6 separates a correct gradient
from a wrong one by many orders of magnitude.
"""

import numpy as np

TOL = {
    np.dtype(np.float32): {"rtol": 1e-5, "atol": 1e-6},
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
}

# Central finite differences, float64 only.
FD_STEP = 1e-6
FD_RTOL = 1e-6


def tol(dtype):
    """Return ``{"rtol": ..., "atol": ...}`` for comparisons in ``dtype``."""
    return TOL[np.dtype(dtype)]


def assert_close(actual, desired, dtype, err_msg=""):
    """``np.testing.assert_allclose`` with the tolerance of ``dtype``."""
    np.testing.assert_allclose(actual, desired, err_msg=err_msg, **tol(dtype))


# Forgetting attention (tests/test_attention.py), compared with the dense
# float64 formula normwise: max |actual - desired| / max(1, max |desired|).
# An output is a convex combination of values whose weights come from a
# fast exp (2 ulp) and a softmax sum of up to T terms; each score is a dot
# product of d terms plus a bias re-based per tile; a gradient adds the
# sums over the other axis of the tile grid, and dlog_f a suffix sum of up
# to T row-minus-column sums.  Observed with T <= 200, d, dv <= 64: float32
# 1e-6 (outputs and gradients alike), float64 2e-15.  The bounds leave
# more than an order of magnitude (float32) and two (float64) for other
# shapes and seeds, and stay far below any real error (a wrong mask, a
# missing tile or gate: errors of 1e-2 and more).
ATTENTION_TOL = {
    np.dtype(np.float32): 3e-5,
    np.dtype(np.float64): 1e-12,
}


def assert_close_scaled(actual, desired, dtype, err_msg=""):
    """``max |actual - desired| <= ATTENTION_TOL[dtype] * max(1, max |desired|)``."""
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"{err_msg}: shape {actual.shape} != {desired.shape}"
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    err = float(np.abs(actual - desired).max(initial=0.0)) / scale
    assert err <= ATTENTION_TOL[np.dtype(dtype)], f"{err_msg}: scaled error {err:.3g}"


# fastgates.dask.objective against fg.scipy_objective on the whole batch,
# relative (normwise for the gradient): the same terms summed in another
# order (each chunk's sum, then a tree over the chunks, instead of one sum
# over the batch) and each chunk's mean scaled by its share of the batch
# instead of one division.  Observed at the test shapes (tests/test_dask.py):
# float64 2e-16 (loss) and 2e-15 (gradient), float32 2e-16 and 8e-7.
# float64 is the contract's bound (1e-12); float32 leaves an order of
# magnitude above its observed value.
DATA_PARALLEL_TOL = {
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-12,
}
