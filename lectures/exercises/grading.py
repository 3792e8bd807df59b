"""How an answer is compared with reffuse's: one check per array, failing with one message that says what is
wrong (the shape, or which element is off and by how much), the way `reffuse verify` reports a whole model."""

from __future__ import annotations

import numpy as np
import pytest

from reffuse.evaluation.activations import error_row
from reffuse.evaluation.verify import TARGETS

# Every input is float64, so a right answer agrees with reffuse's to rounding, about 1e-15 of the largest value,
# whatever order it adds in. reffuse verify's float64 target, 1e-9 of the largest value, leaves a wide margin,
# and a wrong formula (a missing eps, a transposed weight, the wrong RoPE pairs) is off by far more.
RTOL = TARGETS["float64"]["relative"]


def check(what: str, got, want, rtol: float = RTOL) -> None:
    """Fail unless `got` has want's shape and every element is within rtol · max |want| of want's (rtol 0: equal
    bit for bit). `what` names the call and the case, and opens the message."""
    want = np.asarray(want)
    if got is None:
        pytest.fail(f"{what}: returned None; expected an array of shape {want.shape}", pytrace=False)
    try:
        array = np.asarray(got)
    except ValueError as e:  # a ragged list
        pytest.fail(f"{what}: returned a {type(got).__name__} that is not an array ({e})", pytrace=False)
    if not np.issubdtype(array.dtype, np.number):
        pytest.fail(f"{what}: returned a {type(got).__name__} of {array.dtype}, not an array of numbers",
                    pytrace=False)
    got = array
    if got.shape != want.shape:
        pytest.fail(f"{what}: shape {got.shape}, expected {want.shape}", pytrace=False)
    bad = ~np.isfinite(got)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        pytest.fail(f"{what}: {int(bad.sum())} of {got.size} elements are NaN or infinite, the first at "
                    f"{list(first)} (expected {float(want[first]):.6g} there)", pytrace=False)
    row = error_row(what, got, want)
    allowed = rtol * row.max_reference
    if row.max_abs <= allowed:
        return
    difference = np.abs(got.astype(np.float64) - want.astype(np.float64))
    worst = np.unravel_index(difference.argmax(), difference.shape)
    where = f"element {[int(i) for i in worst]}" if worst else "the value"
    wrong = int((difference > allowed).sum())
    tolerance = f"tolerance {rtol:g} of it" if rtol else "expected bit for bit"
    message = (f"{what}: {where} is {float(got[worst]):.8g}, expected {float(want[worst]):.8g}: off by "
               f"{row.max_abs:.2e}, {row.relative:.1e} of the largest expected value "
               f"{row.max_reference:.4g} ({tolerance})")
    if got.size > 1:
        message += f"; {wrong:,} of {got.size:,} elements are off by more"
    if got.dtype != want.dtype:
        message += f"; it is {got.dtype} where {want.dtype} was given: compute in the inputs' precision"
    pytest.fail(message, pytrace=False)


def parts(what: str, got, names: tuple[str, ...]) -> tuple:
    """`got` as a tuple of len(names) values (a function that returns several arrays), or fail saying so."""
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        count = f"{len(got)} values" if isinstance(got, (tuple, list)) else f"a {type(got).__name__}"
        pytest.fail(f"{what}: returned {count}; expected {len(names)}: ({', '.join(names)})", pytrace=False)
    return tuple(got)


def gradients(what: str, got, names: tuple[str, ...]) -> dict:
    """`got` as a dict with exactly the keys `names` (weight gradients by weight name), or fail saying so."""
    if not isinstance(got, dict) or set(got) != set(names):
        found = sorted(got) if isinstance(got, dict) else type(got).__name__
        pytest.fail(f"{what}: the weight gradients are {found}; expected a dict with keys {list(names)}",
                    pytrace=False)
    return got
