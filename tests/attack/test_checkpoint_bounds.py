"""Issue 14 finding 1: a checkpoint's spec cannot make the loader allocate what it asks for. Every size is
bounded, the stored shapes are compared with the spec on the meta device, and only then is the real
module built; `meta` must be a mapping of plain values."""
from __future__ import annotations

import pytest
import torch

from tldr_core.attack import checkpoints as ck
from tldr_core.attack.checkpoints import (CLASSIFIER_FORMAT, GENERATOR_FORMAT, CheckpointError, load_classifier,
                                          load_generator, save_checkpoint)
from tldr_core.attack.model_specs import LIMITS, SpecError, check_classifier_spec, expected_state
from tldr_core.attack.models import FC, MLP, ConditionedGenerator, build_classifier


@pytest.fixture
def mlp_file(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "mlp.pt", MLP((1, 8, 8), 10, hidden=16).eval(), CLASSIFIER_FORMAT, {"a": 1})


def _edit(path, **changes):
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "spec":
            payload["spec"].update(value)
        else:
            payload[key] = value
    torch.save(payload, path)
    return path


@pytest.fixture
def builds(monkeypatch):
    """Records the default device of every build_classifier call the loader makes."""
    seen: list[str] = []

    def spy(spec):
        seen.append(str(torch.get_default_device()))
        return build_classifier(spec)

    monkeypatch.setattr(ck, "build_classifier", spy)
    return seen


def test_a_huge_hidden_layer_is_refused_without_allocating_it(mlp_file, builds):
    # 2,000,000 x 64 + ... floats: 0.5 GB for an mlp, 25 GB for the cnn of the issue; refused on the meta device
    _edit(mlp_file, spec={"hidden": 2_000_000})
    assert mlp_file.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match=r"outside 0\.\.65536"):
        load_classifier(mlp_file)
    assert builds == []  # refused by the bounds alone
    _edit(mlp_file, spec={"arch": "cnn", "hidden": 60_000, "width": 60_000, "dropout": 0.0, "in_shape": [1, 28, 28]})
    with pytest.raises(CheckpointError, match=r"parameters, more than the limit of 100,000,000"):
        load_classifier(mlp_file)
    assert builds == ["meta"]  # shapes counted on the meta device, never built for real


def test_shapes_are_checked_against_the_spec_before_the_real_build(mlp_file, builds):
    _edit(mlp_file, spec={"hidden": 17})  # a small lie: the weights are 16 wide
    with pytest.raises(CheckpointError, match=r"fc\.0\.weight is \(16, 64\), the spec implies \(17, 64\)"):
        load_classifier(mlp_file)
    assert builds == ["meta"]
    _edit(mlp_file, spec={"hidden": 16}, state_dict={"out.weight": torch.zeros(10, 16)})
    with pytest.raises(CheckpointError, match=r"missing \['fc\.0\.bias', 'fc\.0\.weight', 'out\.bias'\]"):
        load_classifier(mlp_file)


def test_a_good_file_still_loads_and_is_built_once_for_real(mlp_file, builds):
    model, meta = load_classifier(mlp_file)
    assert builds == ["meta", "cpu"] and meta == {"a": 1}
    assert model.spec()["hidden"] == 16 and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("change,needle", [
    ({"num_classes": 10 ** 7}, "'num_classes' = 10000000 is outside 1..100000"),
    ({"in_shape": [1, 10 ** 6, 8]}, "'h' = 1000000 is outside 1..4096"),
    ({"in_shape": [10 ** 4, 8, 8]}, "'c' = 10000 is outside 1..16"),
    ({"in_shape": "1x8x8"}, "'in_shape' must be [channels, height, width]"),
    ({"hidden": "16"}, "'hidden' must be an integer, got '16'"),
    ({"hidden": True}, "'hidden' must be an integer, got True"),
    ({"dropout": 2.0}, "'dropout' must be a number in [0, 1)"),
    ({"arch": "resnet"}, "unknown classifier architecture 'resnet'"),
    ({"evil": 1}, "unknown mlp classifier spec key(s) ['evil']"),
])
def test_every_spec_size_and_type_is_bounded(mlp_file, change, needle):
    _edit(mlp_file, spec=change)
    with pytest.raises(CheckpointError) as exc:
        load_classifier(mlp_file)
    assert needle in str(exc.value)


def test_fc_depth_and_widths_are_bounded():
    spec = FC((1, 8, 8), 10, widths=(4,)).spec()
    assert check_classifier_spec(spec) == spec
    with pytest.raises(SpecError, match="1..64 layer widths, got 65 entries"):
        check_classifier_spec({**spec, "widths": [4] * 65})
    with pytest.raises(SpecError, match="outside 1..65536"):
        check_classifier_spec({**spec, "widths": [4, 10 ** 6]})
    # within every per-size bound, but 64 layers of 65,536 units: 2.7e11 parameters, counted without allocating
    with pytest.raises(SpecError, match="more than the limit"):
        expected_state(build_classifier, check_classifier_spec({**spec, "widths": [LIMITS["width"]] * 64}))


def test_a_generator_spec_is_bounded_too(tmp_path):
    gen = ConditionedGenerator("label", 3, (1, 12, 12), latent_dim=4, width=8)
    p = save_checkpoint(tmp_path / "g.pt", gen, GENERATOR_FORMAT)
    _edit(p, spec={"num_classes": 50_000})  # its first layer would be 8 x 25,000^2 wide
    with pytest.raises(CheckpointError, match="more than the limit"):
        load_generator(p)


@pytest.mark.parametrize("meta,needle", [
    ([1, 2, 3], "'meta' must be a mapping with string keys, got list"),
    ("text", "'meta' must be a mapping with string keys, got str"),
    ({1: "a"}, "'meta' must be a mapping with string keys"),
    ({"t": torch.zeros(3)}, "'meta' must hold plain values"),
])
def test_meta_of_the_wrong_type_is_a_clear_error(mlp_file, meta, needle):
    _edit(mlp_file, meta=meta)
    with pytest.raises(CheckpointError) as exc:
        load_classifier(mlp_file)
    assert needle in str(exc.value)


def test_missing_meta_is_empty_and_a_non_mapping_spec_or_state_is_refused(mlp_file):
    _edit(mlp_file, meta=None)
    assert load_classifier(mlp_file)[1] == {}
    _edit(mlp_file, state_dict=[1, 2])
    with pytest.raises(CheckpointError, match="state_dict must be a mapping"):
        load_classifier(mlp_file)
    payload = torch.load(mlp_file, weights_only=True)
    payload["spec"] = ["mlp"]
    torch.save(payload, mlp_file)
    with pytest.raises(CheckpointError, match="unknown classifier architecture None"):
        load_classifier(mlp_file)


def test_an_oversized_file_is_not_read(mlp_file, monkeypatch):
    monkeypatch.setattr(ck, "MAX_FILE_BYTES", 100)
    with pytest.raises(CheckpointError, match="refused without reading it"):
        load_classifier(mlp_file)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(CheckpointError):
        load_classifier(mlp_file)
