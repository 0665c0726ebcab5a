"""Model files are untrusted: no pickled code runs, wrong shapes and corrupt files are clear errors."""
import pickle

import pytest
import torch

from tldr_core.attack.checkpoints import (CLASSIFIER_FORMAT, GENERATOR_FORMAT, CheckpointError, load_classifier,
                                   load_generator, save_checkpoint)
from tldr_core.attack.models import ConditionedGenerator, PaperCNN


class Boom:
    """Unpickling this would run code (a file write) if the loader trusted pickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_keeps_weights_and_meta(tmp_path, tiny_cnn):
    p = save_checkpoint(tmp_path / "c.pt", tiny_cnn, CLASSIFIER_FORMAT, {"test_accuracy": 0.5})
    model, meta = load_classifier(p)
    assert meta == {"test_accuracy": 0.5}
    x = torch.rand(2, 1, 12, 12)
    assert torch.equal(model(x), tiny_cnn(x))
    assert not any(q.requires_grad for q in model.parameters())


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": CLASSIFIER_FORMAT, "spec": {}, "state_dict": {}, "meta": {"x": Boom(str(marker))}}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(bad)
    assert not marker.exists()


def test_plain_pickle_and_garbage_are_clear_errors(tmp_path):
    f = tmp_path / "x.pt"
    f.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_classifier(f)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_classifier(f)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")


def test_truncated_file_is_a_clear_error(tmp_path, tiny_cnn):
    p = save_checkpoint(tmp_path / "c.pt", tiny_cnn, CLASSIFIER_FORMAT)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_classifier(p)


def test_wrong_shape_weights_are_a_clear_error(tmp_path, tiny_cnn):
    p = save_checkpoint(tmp_path / "c.pt", tiny_cnn, CLASSIFIER_FORMAT)
    payload = torch.load(p, weights_only=True)
    payload["spec"]["hidden"] = 9  # claims another architecture than its weights have
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match="do not match"):
        load_classifier(p)


def test_generator_file_is_not_a_classifier(tmp_path):
    gen = ConditionedGenerator("label", 3, (1, 12, 12), latent_dim=4, width=8)
    p = save_checkpoint(tmp_path / "g.pt", gen, GENERATOR_FORMAT)
    with pytest.raises(CheckpointError, match="not a tldr-classifier"):
        load_classifier(p)
    g2, _ = load_generator(p)
    assert g2.spec() == gen.spec()


# ---- the KKT attack's candidates ------------------------------------------------------------------

def _kkt_output():
    from tldr_core.attack import kkt
    from tldr_core.attack.models import FC

    torch.manual_seed(0)
    model = FC((1, 4, 4), 3, widths=(6,)).eval().requires_grad_(False)
    return kkt.run_kkt(model, 3, (1, 4, 4), kkt.KKTConfig(steps=3, per_class=2, lr=0.05), train_per_class=1, log=None)


def test_kkt_candidates_round_trip(tmp_path):
    from tldr_core.attack.checkpoints import LOADERS, load_kkt_candidates, load_module
    from tldr_core.attack.kkt import KKT_FORMAT, KKTCandidates

    out = _kkt_output()
    p = save_checkpoint(tmp_path / "kkt.pt", out.module, out.checkpoint_format, {"dataset": "toy", "steps": 3})
    cand, meta = load_kkt_candidates(p)
    assert isinstance(cand, KKTCandidates) and meta == {"dataset": "toy", "steps": 3}
    assert torch.equal(cand.x, out.module.x) and torch.equal(cand.lam, out.module.lam)
    assert torch.equal(cand.labels, torch.tensor([0, 0, 1, 1, 2, 2])) and cand.labels.dtype == torch.int64
    assert cand.spec() == {"count": 6, "image_shape": [1, 4, 4], "num_classes": 3, "resumable": True}
    assert int(cand.step) == 3 and torch.equal(cand.adam_x_sq, out.module.adam_x_sq)
    assert LOADERS[KKT_FORMAT] is load_kkt_candidates
    again, _ = load_module(p, out.checkpoint_format)
    assert torch.equal(again.x, out.module.x)
    with pytest.raises(CheckpointError, match="not a tldr-generator"):
        load_generator(p)  # formats are not interchangeable
    with pytest.raises(CheckpointError, match="no loader"):
        load_module(p, "tldr-unknown/1")


def test_kkt_candidates_refuse_code_and_inconsistent_files(tmp_path):
    from tldr_core.attack.checkpoints import load_kkt_candidates
    from tldr_core.attack.kkt import KKT_FORMAT

    out = _kkt_output()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": KKT_FORMAT, "spec": out.module.spec(), "state_dict": {}, "meta": {"x": Boom(str(marker))}},
               evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_kkt_candidates(evil)
    assert not marker.exists()
    p = save_checkpoint(tmp_path / "kkt.pt", out.module, KKT_FORMAT)
    payload = torch.load(p, weights_only=True)
    payload["spec"]["count"] = 10 ** 9  # would allocate 16 GB if built before checking
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match="'count' = 1000000000 is outside"):
        load_kkt_candidates(p)
    payload["spec"]["count"] = 6
    payload["state_dict"]["labels"] = torch.tensor([0, 0, 1, 1, 2, 7])
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match="labels outside 0..2"):
        load_kkt_candidates(p)
