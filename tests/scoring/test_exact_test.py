"""Fisher's one-sided exact test (tldr_core.scoring.exact_test) against p-values computed by hand."""
from __future__ import annotations

from math import comb

import pytest
from scipy.stats import fisher_exact

from tldr_core.scoring.exact_test import fisher_greater


def test_small_counts_by_hand():
    # 2 of 3 vs 0 of 3: K = 2 successes in N = 6; P(X >= 2) = C(2,2) C(4,1) / C(6,3) = 4 / 20
    assert fisher_greater(2, 3, 0, 3) == pytest.approx(0.2, abs=1e-15)
    # 1 of 2 vs 1 of 2: P(X >= 1) = 1 - P(X = 0) = 1 - C(2,0) C(2,2) / C(4,2) = 1 - 1/6
    assert fisher_greater(1, 2, 1, 2) == pytest.approx(5 / 6, abs=1e-15)
    # 3 of 100 vs 2 of 100: P(X >= 3 | 5 of 200) = 1/2 by symmetry (P(X >= 3) = P(X <= 2))
    assert fisher_greater(3, 100, 2, 100) == pytest.approx(0.5, abs=1e-15)
    # all successes in A: C(K, K) C(N - K, n_a - K) / C(N, n_a)
    assert fisher_greater(5, 100, 0, 100) == pytest.approx(comb(195, 95) / comb(200, 100), rel=1e-12)
    assert fisher_greater(0, 10, 0, 10) == 1.0
    assert fisher_greater(0, 10, 4, 10) == 1.0  # P(X >= 0)


@pytest.mark.parametrize("a,na,b,nb", [(8, 100, 0, 100), (13, 100, 3, 100), (30, 100, 3, 100), (2, 1000, 0, 1000),
                                       (7, 50, 2, 80)])
def test_agrees_with_scipy(a, na, b, nb):
    want = fisher_exact([[a, na - a], [b, nb - b]], alternative="greater").pvalue
    assert fisher_greater(a, na, b, nb) == pytest.approx(want, rel=1e-9)


def test_rejects_bad_counts():
    for args in ((-1, 3, 0, 3), (4, 3, 0, 3), (1, 3, 1.0, 3), (True, 3, 0, 3)):
        with pytest.raises(ValueError):
            fisher_greater(*args)
