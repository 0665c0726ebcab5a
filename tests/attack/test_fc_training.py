"""The fc options (activation, init_scale) and the training options that reach the KKT premise (L-BFGS
polish, margin stop): specs rebuild the same model, old cache keys stay, the recipes work shrunk."""
import math

import pytest
import torch
from torch import nn

from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, load_classifier, save_checkpoint
from tldr_core.attack.classifier import ClassifierSettings, build_for, cache_key, train_classifier
from tldr_core.attack.data import DatasetBundle, Split, load_dataset
from tldr_core.attack.model_specs import SpecError, check_classifier_spec
from tldr_core.attack.models import FC
from tldr_core.attack.zoo import CONTROLS

pytestmark = pytest.mark.usefixtures("one_thread")


def _bundle() -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    split = lambda: Split(torch.rand(20, 1, 4, 4, generator=g), torch.arange(20) % 2)  # noqa: E731
    return DatasetBundle(name="t", train=split(), heldout=split(), test=split(), num_classes=2,
                         class_names=["a", "b"], image_shape=(1, 4, 4), source="test")


@pytest.mark.parametrize("activation, kind", [("relu", nn.ReLU), ("softplus", nn.Softplus), ("silu", nn.SiLU),
                                              ("gelu", nn.GELU)])
def test_fc_activation_is_in_the_spec_and_a_checkpoint_rebuilds_it(tmp_path, activation, kind):
    torch.manual_seed(0)
    model = FC((1, 4, 4), 3, widths=(6, 5), activation=activation, beta=4.0).eval()
    assert isinstance(model.fc[1], kind) and isinstance(model.fc[3], kind)
    spec = model.spec()
    assert ("activation" in spec) == (activation != "relu") and ("beta" in spec) == (activation == "softplus")
    path = save_checkpoint(tmp_path / "m.pt", model, CLASSIFIER_FORMAT, {})
    again, _ = load_classifier(path)
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(again(x), model(x)) and again.spec() == spec
    if activation == "softplus":
        assert again.fc[1].beta == 4.0


def test_init_scale_multiplies_the_default_init_of_every_or_the_first_layer():
    torch.manual_seed(0)
    ref = FC((1, 4, 4), 3, widths=(6,))
    torch.manual_seed(0)
    small = FC((1, 4, 4), 3, widths=(6,), init_scale=1e-3)
    torch.manual_seed(0)
    first = FC((1, 4, 4), 3, widths=(6,), init_scale=1e-3, init_layers="first")
    for (name, a), b, c in zip(ref.named_parameters(), small.parameters(), first.parameters()):
        assert torch.allclose(b, 1e-3 * a, rtol=1e-6)
        assert torch.allclose(c, 1e-3 * a if name.startswith("fc.0") else a, rtol=1e-6)
    assert small.spec()["init_scale"] == 1e-3 and first.spec()["init_layers"] == "first"
    assert "init_scale" not in ref.spec() and "init_layers" not in small.spec()


def test_spec_checks_refuse_bad_fc_options():
    spec = FC((1, 4, 4), 3, widths=(6,)).spec()
    assert check_classifier_spec({**spec, "activation": "gelu", "init_scale": 0.5})["activation"] == "gelu"
    for bad, match in (({"activation": "tanh"}, "activation"), ({"beta": 0}, "beta"),
                       ({"init_scale": float("nan")}, "init_scale"), ({"init_layers": "last"}, "init_layers")):
        with pytest.raises(SpecError, match=match):
            check_classifier_spec({**spec, **bad})


def test_cache_keys_of_existing_settings_are_unchanged():
    """Computed with the code before the later options existed (same synthetic bundle): a cached
    classifier keeps its file name, and a default-valued option leaves the key alone."""
    b = _bundle()
    assert cache_key(b, CONTROLS["leaky-fc"].settings) == "c745ffb0b9a65195"
    assert cache_key(b, CONTROLS["leaky-cnn"].settings) == "215c656cbde38f17"
    assert cache_key(b, ClassifierSettings()) == "28067f52d78087a9"
    assert cache_key(b, ClassifierSettings(polish_target=1e-3, init_scale=1.0)) == "28067f52d78087a9"
    assert cache_key(b, ClassifierSettings(arch="fc", activation="silu")) != cache_key(b, ClassifierSettings(arch="fc"))


def test_settings_validation():
    with pytest.raises(ValueError, match="fc architecture"):
        ClassifierSettings(arch="cnn", activation="softplus")
    with pytest.raises(ValueError, match="needs weight_decay > 0"):
        ClassifierSettings(arch="fc", polish_steps=10)
    with pytest.raises(ValueError, match="without weight decay"):
        ClassifierSettings(arch="fc", weight_decay=1e-3, margin_window=10)
    with pytest.raises(ValueError, match="unknown activation"):
        ClassifierSettings(arch="fc", activation="tanh")
    spec = build_for(_bundle(), ClassifierSettings(arch="fc", hidden=8, activation="softplus", softplus_beta=3.0)).spec()
    assert spec["activation"] == "softplus" and spec["beta"] == 3.0


def _shrunk(name: str, **changes):
    from dataclasses import replace

    from tldr_core.cli.controls import shrink

    control = shrink(CONTROLS[name])
    return control, replace(control.settings, **changes)


def test_stationary_fc_recipe_shrunk_reaches_its_residual_target():
    control, settings = _shrunk("stationary-fc", epochs=100)
    data = load_dataset("digits-8x8", control.train_size, seed=0, test_size=60)
    model, meta = train_classifier(data, settings, log=lambda s: None)
    assert meta["polish_residual"] <= 1e-3 and meta["stationarity_residual"] == meta["polish_residual"]
    assert 0 < meta["polish_steps"] <= settings.polish_steps and meta["train_epochs"] == 100
    assert isinstance(model.fc[1], nn.Softplus) and meta["train_accuracy"] == 1.0
    from tldr_core.scoring.stationarity import stationarity

    assert stationarity(model, data.train, meta).residual == pytest.approx(meta["stationarity_residual"], rel=1e-9)


def test_margin_stop_ends_training_once_the_normalised_margin_stalls():
    control, settings = _shrunk("margin-fc", epochs=3000, margin_window=50, margin_tol=0.05)
    data = load_dataset("digits-8x8", control.train_size, seed=0, test_size=60)
    model, meta = train_classifier(data, settings, log=lambda s: None)
    assert meta["train_stop"] == "margin" and meta["train_epochs"] < 3000 and meta["train_epochs"] % 50 == 0
    assert meta["min_margin"] > 0 and meta["train_accuracy"] == 1.0 and "stationarity_residual" not in meta
    # the first layer started at 1e-4 of its default scale, the others at the default
    torch.manual_seed(settings.seed)
    fresh = build_for(data, settings)
    bound = 1 / math.sqrt(64)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fresh.fc[0].weight.abs().max() <= 1e-4 * bound and fresh.fc[2].weight.abs().max() > 1e-2 * bound
