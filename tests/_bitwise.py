"""Bitwise comparison of nested results (arrays in tuples, lists and dicts)."""

import numpy as np


def flat(result):
    """Every array in a nested result, in a fixed order."""
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, dict):
        return [a for k in result for a in flat(result[k])]
    if isinstance(result, (tuple, list)):
        return [a for r in result for a in flat(r)]
    return []


def assert_bitwise(a, b):
    """The same arrays, dtypes, shapes and bytes, in the same places."""
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for u, v in zip(fa, fb):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()
