"""Fisher's exact test for "more successes in group A than in group B" (one-sided), exact in integers.

Used by the risk rule on one-to-one match counts: ``a`` of ``n_a`` training images matched at an
SSIM bar against ``b`` of ``n_b`` held-out images. Under the null hypothesis (matching does not
depend on membership) and given the ``a + b`` matches in all, the number in group A is
hypergeometric; the p-value is the probability of ``a`` or more:

    p = sum_{k=a}^{min(K, n_a)} C(K, k) C(N - K, n_a - k) / C(N, n_a),   K = a + b, N = n_a + n_b.

Binomial coefficients are Python integers, so the sum is exact before the one division.
"""
from __future__ import annotations

from fractions import Fraction
from math import comb

__all__ = ["fisher_greater"]


def fisher_greater(a: int, n_a: int, b: int, n_b: int) -> float:
    """One-sided Fisher exact p-value that group A (``a`` successes of ``n_a``) has a higher success
    rate than group B (``b`` of ``n_b``). 1.0 when there are no successes at all."""
    for name, v in (("a", a), ("n_a", n_a), ("b", b), ("n_b", n_b)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if a > n_a or b > n_b:
        raise ValueError(f"successes exceed trials: {a}/{n_a}, {b}/{n_b}")
    k_total, n_total = a + b, n_a + n_b
    if k_total == 0:
        return 1.0
    top = sum(comb(k_total, k) * comb(n_total - k_total, n_a - k) for k in range(a, min(k_total, n_a) + 1))
    return float(Fraction(top, comb(n_total, n_a)))
