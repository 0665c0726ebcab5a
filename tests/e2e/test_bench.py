"""Correctness of what ISSUE 6 added: the SSIM upper bound, the pruned (provable) and prefilter
(estimate-ranked, checked empirically) nearest-neighbour searches, each identical to brute force here,
and a smoke run of the benchmark suite. No timing assertions here:
speed lives in docs/benchmarks.md (bench/run.py)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tldr_core.scoring import metrics, nearest
from tldr_core.scoring.ssim import BOUND_MARGIN, WindowStats, ssim_matrix, ssim_upper_bound

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class S:
    images: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(autouse=True)
def _small_search(monkeypatch):
    """Make the pruned path engage on test-sized sets (it falls back to brute force below 512
    references per class) and keep one thread (shared 2-core box)."""
    monkeypatch.setattr(nearest, "_PRUNE_MIN_REFS", 16)
    monkeypatch.setattr(nearest, "_PROBE", 48)
    monkeypatch.setattr(nearest, "_FIRST_ROUND", 4)
    monkeypatch.setattr(nearest, "_PREFILTER_MIN_REFS", 16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smooth(n: int, shape=(1, 16, 16), seed: int = 0, grid: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, shape[0], grid, grid, generator=g)
    return F.interpolate(low, size=shape[1:], mode="bicubic", align_corners=False).clamp(0, 1)


def near_copies(x: torch.Tensor, seed: int, sigma: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def assert_same_nn(recon, rl, ref, fl):
    """Both fast searches equal brute force; returns the pruned result and its statistics."""
    b = metrics.nn_ssim(recon, rl, ref, fl, method="brute")
    out = {}
    for method in ("pruned", "prefilter"):
        st = nearest.SearchStats()
        a = metrics.nn_ssim(recon, rl, ref, fl, method=method, stats=st)
        assert torch.equal(a.index, b.index), method
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)
        out[method] = (a, st)
    return out["pruned"]


# ---- the bound ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 12, 10), (1, 8, 8), (1, 5, 6)])
def test_upper_bound_holds(shape):
    a = torch.cat([smooth(6, shape, 1), torch.rand(4, *shape), torch.zeros(1, *shape), torch.ones(1, *shape),
                   torch.full((1, *shape), 0.3)])
    b = torch.cat([smooth(20, shape, 2), near_copies(a[:6], 3), torch.rand(5, *shape), a[-3:]])
    u = ssim_upper_bound(WindowStats(a), WindowStats(b))
    m = ssim_matrix(a, b)
    assert u.shape == m.shape
    assert (m <= u + BOUND_MARGIN).all(), float((m - u).max())
    # identical images: the bound is attained (SSIM = 1 and |cov| = sd*sd)
    same = ssim_upper_bound(WindowStats(a[:6]), WindowStats(a[:6])).diagonal()
    torch.testing.assert_close(same, torch.ones(6), atol=1e-5, rtol=0)


def test_upper_bound_shape_mismatch():
    with pytest.raises(ValueError):
        ssim_upper_bound(WindowStats(torch.rand(2, 1, 8, 8)), WindowStats(torch.rand(2, 1, 9, 9)))


# ---- pruned search == brute force --------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_brute_near_copies(seed):
    ref = smooth(300, seed=seed)
    fl = torch.arange(300) % 3
    recon = near_copies(ref[:12], seed + 10)
    a, st = assert_same_nn(recon, fl[:12], ref, fl)
    assert torch.equal(a.index, torch.arange(12))  # each copy finds its original
    assert st.exact_pairs < st.pairs  # and the bound really pruned


@pytest.mark.parametrize("kind", ["fresh", "noise", "mixed", "flat"])
def test_pruned_equals_brute_other_data(kind):
    ref = smooth(240, seed=5)
    fl = torch.arange(240) % 2
    recon = {"fresh": smooth(8, seed=6), "noise": torch.rand(8, 1, 16, 16),
             "mixed": torch.cat([near_copies(ref[:4], 7), smooth(4, seed=8)]),
             "flat": torch.full((8, 1, 16, 16), 0.5)}[kind]
    rl = torch.arange(8) % 2
    assert_same_nn(recon, rl, ref, fl)


def test_ties_go_to_the_lowest_index():
    ref = smooth(200, seed=3)
    fl = torch.zeros(200, dtype=torch.int64)
    ref[150] = ref[40]  # duplicates of the true nearest image, after and before it
    ref[170] = ref[40]
    ref[7] = ref[40]
    recon = near_copies(ref[40:41], 4)
    a, _ = assert_same_nn(recon, torch.zeros(1, dtype=torch.int64), ref, fl)
    assert a.index.item() == 7


def test_true_nn_with_low_bound_rank():
    """The nearest image (by exact SSIM) is far down the bound's ranking: contrast-reduced copies
    lose bound (the bound assumes perfectly correlated windows), while decoys with the recon's own
    contrast but other structure keep a high bound. The search must still find the true one."""
    g = torch.Generator().manual_seed(0)
    recon = smooth(1, seed=11)
    nn = (0.5 * recon + 0.25).clamp(0, 1)  # same structure, half the contrast: high SSIM, lower bound
    decoys = torch.cat([recon.flip(-1), recon.flip(-2), recon.transpose(-1, -2), recon.flip(-1, -2)])
    decoys = torch.cat([near_copies(decoys, k, 0.02) for k in range(30)])  # 120 images
    ref = torch.cat([decoys, nn, smooth(60, seed=12)])
    fl = torch.zeros(ref.shape[0], dtype=torch.int64)
    bound = ssim_upper_bound(WindowStats(recon), WindowStats(ref))[0]
    exact = ssim_matrix(recon, ref)[0]
    true_nn = int(exact.argmax())
    assert true_nn == 120
    rank = int((bound > bound[true_nn]).sum())
    assert rank >= 10, rank  # the construction does what it says
    a, _ = assert_same_nn(recon, torch.zeros(1, dtype=torch.int64), ref, fl)
    assert a.index.item() == 120
    del g


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.9])
def test_score_reconstructions_pruned_equals_brute(tau):
    imgs = smooth(800, seed=21)
    labels = torch.arange(800) % 4
    train, held = S(imgs[:400], labels[:400]), S(imgs[400:], labels[400:])
    recon = torch.cat([near_copies(train.images[:8], 22), smooth(8, seed=23)])
    rl = torch.cat([train.labels[:8], torch.arange(8) % 4])
    b = metrics.score_reconstructions(recon, rl, train, held, tau=tau, n_boot=50, method="brute")
    p = metrics.score_reconstructions(recon, rl, train, held, tau=tau, n_boot=50, method="pruned")
    t_index = nearest.ReferenceIndex(train.images, train.labels)
    p1 = metrics.score_reconstructions(recon, rl, t_index, held, tau=tau, n_boot=50, method="pruned")
    p2 = metrics.score_reconstructions(recon, rl, t_index, held, tau=tau, n_boot=50, method="pruned")  # cached stats
    p3 = metrics.score_reconstructions(recon, rl, train, held, tau=tau, n_boot=50)  # default: prefilter
    for k in metrics.METRIC_KEYS:
        if k == "label_agreement":
            continue
        for got in (p, p1, p2, p3):
            assert got[k] == pytest.approx(b[k], abs=1e-6), k
    if tau < 0.9:
        assert b["coverage"] > 0  # the coverage flags were really exercised


def test_prefilter_scores_few_pairs_exactly():
    ref = smooth(2000, seed=51)
    fl = torch.arange(2000) % 2
    recon = torch.cat([near_copies(ref[:4], 52), smooth(4, seed=53)])
    rl = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    b = metrics.nn_ssim(recon, rl, ref, fl, method="brute")
    st = nearest.SearchStats()
    a = metrics.nn_ssim(recon, rl, ref, fl, method="prefilter", stats=st)
    assert torch.equal(a.index, b.index)
    assert st.pairs == 8 * 1000 and st.exact_pairs < 0.2 * st.pairs


def test_unequal_heldout_sizes_and_cache_invalidation():
    imgs = smooth(500, seed=31)
    labels = torch.arange(500) % 2
    train, held = S(imgs[:300], labels[:300]), S(imgs[300:], labels[300:])  # H smaller: T_m used for the gap
    recon = near_copies(train.images[:6], 32)
    rl = train.labels[:6]
    first = metrics.score_reconstructions(recon, rl, train, held, n_boot=20)
    assert first == pytest.approx(metrics.score_reconstructions(recon, rl, train, held, n_boot=20, method="brute"), abs=1e-6,
                                  nan_ok=True)
    t_index = nearest.ReferenceIndex(train.images, train.labels)  # shares train.images' storage
    metrics.score_reconstructions(recon, rl, t_index, held, n_boot=20, method="pruned")  # caches T's statistics
    assert t_index._cache  # the pruned search really used (and kept) window statistics
    train.images[:6] = torch.rand(6, 1, 16, 16)  # in-place change: cached statistics must not be reused
    brute = metrics.score_reconstructions(recon, rl, train, held, n_boot=20, method="brute")
    for method in ("prefilter", "pruned"):
        again = metrics.score_reconstructions(recon, rl, t_index, held, n_boot=20, method=method)
        assert again == pytest.approx(brute, abs=1e-6, nan_ok=True), method


def test_fallbacks_and_errors():
    ref = smooth(100, seed=41) - 0.2  # negative pixels: the bound does not apply, brute force is used
    fl = torch.zeros(100, dtype=torch.int64)
    assert_same_nn(ref[:3] + 0.01, torch.zeros(3, dtype=torch.int64), ref, fl)
    with pytest.raises(ValueError, match="method"):
        metrics.nn_ssim(ref[:1], fl[:1], ref, fl, method="fast")


# ---- the suite runs ----------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_tiny_runs_end_to_end(tmp_path):
    """bench/run.py --tiny (every section but Ray, smallest sizes; ~25 s of CPU) writes the table."""
    out = tmp_path / "bench.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = out.read_text()
    for heading in ("Generator training steps per second", "Cost of each loss term", "Grad in its forms",
                    "Scoring", "Peak memory of a trial"):
        assert heading in text
    assert "not measured (no GPU lent to this task)" in text
    assert "| False |" not in text  # pruned and brute scoring agreed


def test_ray_section_runs_the_same_fixed_trials(tmp_path):
    """The overhead comparison is only fair if tune/search.py runs exactly the plain loop's configurations:
    each enqueued point must fix every parameter Optuna would otherwise sample."""
    import importlib.util

    import optuna

    from tldr_core.platform.search.spaces.load import load_space

    spec = importlib.util.spec_from_file_location("tldr_bench_run", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.fixed_trials_space(tmp_path / "space.yaml", 8)
    space = load_space(tmp_path / "space.yaml")
    assert len(space.initial_points) == 8
    seen = set()
    for point in space.initial_points:
        # FixedTrial raises if the define-by-run space asks for a parameter the point does not fix
        config = space(optuna.trial.FixedTrial(space.to_optuna_params(point)))
        cfg = space.attack_config(config)
        assert cfg == space.attack_config(point)  # what the Tune trial gets == what the plain loop runs
        seen.add((cfg.variant, cfg.weights.grad > 0))
    assert len(seen) == 8  # four variants, with and without the expensive terms


def test_kkt_section_measures_and_renders():
    """The KKT steps/s section (tiny sizes: ~1 s): a row per device with a positive rate, rendered as a table;
    without CUDA the GPU row says it was not measured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tldr_bench_run_kkt", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert "kkt" in bench.SECTIONS
    sec = bench.FUNCTIONS["kkt"](False, True)
    devices = [r["device"] for r in sec["rows"]]
    assert devices == ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for r in sec["rows"]:
        assert r["steps_per_s"] > 0 and r["candidates"] == 20 and r["steps"] == 3 and r["network"] == "784-100-100-10"
    text = bench.render({"machine": bench.machine(), "load_start": 0.0, "load_end": 0.0, "kkt": sec}, True, 1.0)
    assert "## KKT (stationarity) attack steps per second" in text
    assert "| cpu | 784-100-100-10 | 20 | 3 |" in text
    assert ("not measured" in text.split("## KKT")[1]) == (not torch.cuda.is_available())
