"""The pyfunc flavour of registered generators: it samples with `train.generate` (dropout on during
generation), so the model loaded back from the registry reproduces the scored reconstructions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tldr_core.attack.checkpoints import GENERATOR_FORMAT, load_generator, save_checkpoint
from tldr_core.attack.models import ConditionedGenerator
from tldr_core.attack.train import generate
from tldr_core.platform.registry.pyfunc import CheckpointPyfunc, pick_requested, scored_sample

PER_CLASS, SEED = 2, 5


@pytest.fixture
def generator_ckpt(tmp_path):
    """A tiny generator with heavy dropout and batch-norm statistics that are not the defaults."""
    torch.manual_seed(0)
    gen = ConditionedGenerator("label", 3, (1, 12, 12), 8, 0.5, width=8)
    gen.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from 0 / 1
            labels = torch.randint(0, 3, (6,))
            gen(torch.randn(6, 8), torch.nn.functional.one_hot(labels, 3).float(), labels)
    meta = {"attack": {"per_class": 20, "seed": 0}, "sample": {"per_class": PER_CLASS, "seed": SEED}}
    path = save_checkpoint(tmp_path / "gen.pt", gen.eval(), GENERATOR_FORMAT, meta)
    return gen, path


def test_pick_requested_maps_each_label_to_its_next_image():
    # class-ordered batch with per_class 2: rows 0,1 class 0; 2,3 class 1; 4,5 class 2
    assert pick_requested([2, 0, 2, 1], 2, 3) == [4, 0, 5, 2]
    with pytest.raises(ValueError, match="outside 0..2"):
        pick_requested([3], 2, 3)


def test_scored_sample_prefers_the_recorded_sample():
    assert scored_sample({"sample": {"per_class": 7, "seed": 4}, "attack": {"per_class": 20, "seed": 0}}) == \
        {"per_class": 7, "seed": 4}
    assert scored_sample({"attack": {"per_class": 20, "seed": 3}}) == {"per_class": 20, "seed": 4}  # seed + 1
    assert scored_sample({}) == {}


def test_predict_is_generate(generator_ckpt):
    gen, path = generator_ckpt
    expected, labels = generate(gen, PER_CLASS, seed=SEED)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    model = CheckpointPyfunc(path)
    out = model.predict({"per_class": [PER_CLASS], "seed": [SEED]})
    assert isinstance(out, np.ndarray) and torch.equal(torch.from_numpy(out), expected)
    assert torch.equal(torch.from_numpy(model.predict({})), expected)  # defaults: the scored per_class and seed
    picked = model.predict({"label": [2, 0, 2], "seed": SEED})
    assert torch.equal(torch.from_numpy(picked), expected[[4, 0, 5]])
    # the sampler this replaced (dropout off, its own z) gives other images: the test can tell them apart
    without_dropout, _ = generate(gen, PER_CLASS, seed=SEED, dropout=False)
    assert (without_dropout - expected).abs().max() > 1e-3


def test_classifier_predict_gives_probabilities(tmp_path, tiny_cnn):
    from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT

    path = save_checkpoint(tmp_path / "clf.pt", tiny_cnn, CLASSIFIER_FORMAT, {})
    probs = CheckpointPyfunc(path).predict(np.zeros((4, 1, 12, 12), dtype=np.float32))
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_registered_generator_reproduces_the_scored_reconstructions(generator_ckpt, tmp_path):
    import mlflow

    from tldr_core.platform.registry import models as rg
    from tldr_core.platform.tracking import store as tr

    gen, path = generator_ckpt
    scored, _ = generate(gen, PER_CLASS, seed=SEED)  # what a trial scores: the in-memory generator
    c = tr.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tr.ensure_experiment(c, "pyfunc-test", tmp_path / "mlartifacts")
    run_id = c.create_run(exp).info.run_id
    info = rg.log_checkpoint_model(c, run_id, path, "generator")
    c.create_registered_model("tldr-generator-toy")
    mv = c.create_model_version("tldr-generator-toy", source=info.model_uri, run_id=run_id, model_id=info.model_id)
    model = mlflow.pyfunc.load_model(f"models:/tldr-generator-toy/{mv.version}")
    out = model.predict({"per_class": PER_CLASS, "seed": SEED})
    assert torch.equal(torch.from_numpy(np.asarray(out)), scored)
    assert torch.equal(torch.from_numpy(np.asarray(model.predict({}))), scored)
    reloaded, _ = load_generator(path)
    assert torch.equal(generate(reloaded, PER_CLASS, seed=SEED)[0], scored)


_LOAD_IN_FRESH_VENV = """
import importlib.util, sys
import numpy as np
assert importlib.util.find_spec("tldr_core") is None, "tldr_core must come from the model, not this venv"
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[2], np.asarray(model.predict({"per_class": int(sys.argv[3]), "seed": int(sys.argv[4])})))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_logged_generator_loads_in_a_fresh_venv_with_only_its_requirements(generator_ckpt, tmp_path):
    """A plain venv (no system site-packages, no tldr_core) with the model's requirements.txt installed by
    pip: mlflow.pyfunc.load_model works from the model folder alone (its code_paths) and reproduces the
    scored images."""
    import os
    import subprocess
    import sys

    import mlflow

    from tldr_core.platform.registry import models as rg
    from tldr_core.platform.tracking import store as tr

    gen, path = generator_ckpt
    c = tr.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = c.create_run(tr.ensure_experiment(c, "fresh-venv", tmp_path / "art")).info.run_id
    info = rg.log_checkpoint_model(c, run_id, path, "generator")
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"torch", "mlflow-skinny", "pandas", "numpy", "pyyaml"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # the same torch thread count as this process: under xdist this worker runs 1 thread and a plain python
    # would take 2, and a convolution split over another thread count sums in another order (CI: 1-ulp diffs)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    # --no-compile: pip byte-compiled every installed file (torch's and mlflow's thousands), over a third of
    # this test's time; the load below compiles only the modules it imports
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-r",
                          str(model_dir / "requirements.txt")], capture_output=True, text=True, timeout=1500, env=env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    script = tmp_path / "load.py"
    script.write_text(_LOAD_IN_FRESH_VENV)
    out = subprocess.run([str(venv / "bin" / "python"), str(script), str(model_dir), str(tmp_path / "out.npy"),
                          str(PER_CLASS), str(SEED)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    expected, _ = generate(gen, PER_CLASS, seed=SEED)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "out.npy")), expected)
