"""tldr_core.scoring.nearest: the explicit ReferenceIndex (its statistics cache and its invalidation) and
SearchStats owned by the caller (no module-global state)."""
from __future__ import annotations

import pytest
import torch

from tldr_core.scoring import nearest
from tldr_core.scoring.nearest import NearestResult, ReferenceIndex, SearchStats, nn_ssim
from tldr_core.scoring.ssim import WindowStats, ssim_matrix

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _refs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(12, 1, 8, 8, generator=g), torch.tensor([0, 1, 2] * 4)


def test_brute_force_counts_pairs_on_the_callers_stats():
    ref, lab = _refs()
    recon, rl = ref[[0, 1, 3]], torch.tensor([0, 1, 0])  # class 0: 2 recon x 4 refs, class 1: 1 x 4
    st = SearchStats()
    res = nn_ssim(recon, rl, ref, lab, method="brute", stats=st)
    assert (st.pairs, st.exact_pairs, st.brute_classes, st.refs) == (2 * 4 + 1 * 4, 12, 2, 8)
    again = SearchStats()
    ReferenceIndex(ref, lab).nearest(recon, rl, method="brute", stats=again)
    assert again == st  # a second caller's stats start from zero: nothing global
    ReferenceIndex(ref, lab).nearest(recon, rl, method="brute", stats=st)
    assert st.pairs == 24  # accumulates on the object the caller owns
    assert isinstance(res, NearestResult) and res.index.tolist() == [0, 1, 3]
    assert res.values.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_nearest_is_the_same_class_argmax_with_ties_to_the_lowest_index():
    ref, lab = _refs()
    ref[9] = ref[6]  # class 0 holds indices 0, 3, 6, 9: 6 and 9 are identical
    recon = (ref[6:7] + 0.01).clamp(0, 1)
    res = ReferenceIndex(ref, lab).nearest(recon, torch.tensor([0]), method="brute")
    assert res.index.item() == 6
    assert res.values.item() == pytest.approx(float(ssim_matrix(recon, ref[6:7])), abs=1e-6)


def test_index_duck_types_as_a_split_and_checks_its_inputs():
    ref, lab = _refs()
    idx = ReferenceIndex(ref, lab)
    assert idx.images.data_ptr() == ref.data_ptr() and len(idx) == 12  # a view, not a copy
    assert ReferenceIndex.of(idx) is idx
    assert ReferenceIndex.of(type("S", (), {"images": ref, "labels": lab})()).labels.tolist() == lab.tolist()
    with pytest.raises(TypeError, match="train must have"):
        ReferenceIndex.of(object(), "train")
    with pytest.raises(ValueError, match="3 labels for 12 images"):
        ReferenceIndex(ref, lab[:3])
    with pytest.raises(ValueError, match="class 5"):
        idx.nearest(ref[:1], torch.tensor([5]))
    with pytest.raises(ValueError, match="method"):
        idx.nearest(ref[:1], torch.tensor([0]), method="fast")


def test_window_statistics_are_cached_per_subset_and_dropped_on_in_place_change(monkeypatch):
    ref, lab = _refs()
    made = []
    real = nearest.WindowStats

    def counting(x, *a, **k):
        made.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(nearest, "WindowStats", counting)
    idx = ReferenceIndex(ref, lab)
    sub = torch.tensor([0, 3, 6])
    first = idx.stats(sub)
    assert idx.stats(sub) is first and made == [3]  # reused
    idx.stats(torch.tensor([0, 3]))
    assert made == [3, 2]  # another subset is another entry
    ref[0] += 0.0  # in place: the index shares the storage, its statistics are stale now
    fresh = idx.stats(sub)
    assert fresh is not first and made == [3, 2, 3]
    torch.testing.assert_close(fresh.mu, WindowStats(ref[sub]).mu)


def test_cache_is_bounded_by_bytes():
    ref, lab = _refs()
    one = WindowStats(ref[:2]).nbytes
    idx = ReferenceIndex(ref, lab, cache_bytes=one)  # room for one 2-image entry
    a = idx.stats(torch.tensor([0, 1]))
    idx.stats(torch.tensor([2, 3]))
    assert len(idx._cache) == 1 and idx.stats(torch.tensor([0, 1])) is not a  # the older one was evicted
