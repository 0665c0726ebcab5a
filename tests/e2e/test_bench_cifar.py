"""The CIFAR-10 cost section of the benchmarks: its FLOP and memory counter, the ASHA arithmetic and the
projection are checked against hand-computed values; the section itself runs at tiny sizes. No timings."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("tldr_bench_run_cifar", ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from bench import cifar_section
    return mod, cifar_section


def test_step_cost_counts_matmul_flops_forward_and_backward():
    _, cs = _bench()
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    with cs.StepCost() as cost:
        (x @ w).sum().backward()
    # forward 2*8*16*4; backward: dL/dx = g @ w.T and dL/dw = x.T @ g, each as many again
    assert cost.flops == 3 * 2 * 8 * 16 * 4


def test_step_cost_tracks_the_peak_of_live_storage():
    _, cs = _bench()
    with cs.StepCost() as cost:
        a = torch.zeros(1024, 256)  # 1 MiB
        b = torch.ones(1024, 256)   # 1 MiB, both alive
        del a, b
        c = torch.zeros(512, 256)   # 0.5 MiB after both were freed
    assert cost.peak == 2 * 2**20 and cost.live == c.untyped_storage().nbytes()


@pytest.mark.parametrize("max_t, grace, want", [(400, 100, 200.0), (400, 400, 400.0), (800, 100, 250.0)])
def test_asha_mean_steps(max_t, grace, want):
    _, cs = _bench()
    assert cs.asha_mean_steps(max_t, grace) == want


def test_projection_from_hand_numbers():
    _, cs = _bench()
    cost = {"rows": [{"what": "KKT step", "s_per_step": 9.0, "gflop_per_step": 1.0, "peak_tensor_mb": 1.0},
                     {"what": "generator step, reconstruction (x)", "s_per_step": 0.5, "gflop_per_step": 10.0,
                      "peak_tensor_mb": 200.0}]}
    trials = {"trials": 2, "steps": 40, "rows": [{"concurrent": 1, "seconds": 100.0}, {"concurrent": 2, "seconds": 60.0}]}
    p = cs.projection(cost, trials)
    assert p["fixed_s"] == pytest.approx(30.0)  # 50 s a trial, 20 of them steps
    fifo, asha = p["rows"]
    assert fifo["trial_cpu_s"] == pytest.approx(400 * 0.5 + 30) and fifo["cpu_hours"] == pytest.approx(200 * 230 / 3600)
    assert fifo["pflop"] == pytest.approx(200 * 400 * 10 / 1e6)
    assert asha["mean_steps"] == 200 and asha["cpu_hours"] == pytest.approx(200 * 130 / 3600)


@pytest.mark.slow
def test_cifar_section_runs_and_renders():
    bench, _ = _bench()
    sec = bench.FUNCTIONS["cifar"](False, True)
    assert [r["what"].split(",")[0] for r in sec["rows"]] == ["generator step", "KKT step"]
    for r in sec["rows"]:
        assert r["s_per_step"] > 0 and r["gflop_per_step"] > 0 and r["peak_tensor_mb"] > 0
    assert sec["scoring"][0]["n_train"] == 500 and sec["scoring"][0]["seconds"] > 0
    text = bench.render({"machine": bench.machine(), "load_start": 0.0, "load_end": 0.0, "cifar": sec}, True, 1.0)
    assert "## CIFAR-10 (3x32x32): cost of one step" in text and "| 500 | 40 |" in text
