"""Gradients by central differences: slow, simple, and independent of any derivation, which is what a hand-written
backward (reffuse's or your own) is checked against.

    ∂L/∂a_i ≈ (L(a + h e_i) - L(a - h e_i)) / 2h

In float64 with h = 1e-6 the truncation error is of order h² · L''' ≈ 1e-12 and the rounding error of order
1e-16 · |L| / h ≈ 1e-10 |L|: a right gradient agrees to about 1e-8 relative, a wrong one by far less.
"""

from __future__ import annotations

import numpy as np


def numerical_gradient(loss, array, step: float = 1e-6, indices=None):
    """∂loss()/∂array at every entry (or at `indices`, a list of index tuples, the others left 0). `array` is
    perturbed in place and restored; `loss` is a function of no arguments that reads it."""
    grad = np.zeros_like(array)
    for index in (np.ndindex(array.shape) if indices is None else indices):
        kept = array[index]
        array[index] = kept + step
        up = loss()
        array[index] = kept - step
        down = loss()
        array[index] = kept
        grad[index] = (up - down) / (2 * step)
    return grad


def relative_error(analytic, numerical, indices=None) -> float:
    """max |analytic - numerical| / max |numerical| (over `indices` when given). Where the numerical gradient is 0
    to rounding (below 1e-8), the absolute difference: a gradient that is truly zero must come out zero."""
    if indices is not None:
        rows = tuple(np.array(i) for i in zip(*indices))
        analytic, numerical = np.asarray(analytic)[rows], np.asarray(numerical)[rows]
    scale = float(np.abs(numerical).max())
    return float(np.abs(analytic - numerical).max()) / (scale if scale > 1e-8 else 1.0)
