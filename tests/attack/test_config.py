"""LossWeights / AttackConfig validation and the YAML layer."""
import pytest

from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights, load_yaml_config


def test_nine_weight_names_are_the_single_source():
    assert LossWeights.names() == ("kl", "kl_pert", "ce", "ce_pert", "cos", "ortho", "var", "pix", "grad")
    assert set(AttackConfig().flat()) >= set(LossWeights.names())


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "abc", True, None])
def test_negative_or_non_numeric_weights_are_rejected(bad):
    with pytest.raises(ConfigError, match="ce"):
        LossWeights.from_mapping({"ce": bad})


def test_numeric_strings_from_the_cli_are_parsed():
    assert LossWeights.from_mapping({"grad": "0.25"}).grad == 0.25


def test_inversion_zeroes_the_reconstruction_only_terms():
    w = LossWeights().for_mode("inversion")
    assert w.var == w.pix == w.grad == w.kl_pert == w.ce_pert == 0
    assert w.kl == LossWeights().kl


def test_yaml_flat_and_nested_and_unknown_keys(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("variant: matrix\nsteps: 10\nweights:\n  grad: 0.0\ncos: 2\n")
    cfg = load_yaml_config(f)
    assert (cfg.variant, cfg.steps, cfg.weights.grad, cfg.weights.cos) == ("matrix", 10, 0.0, 2.0)
    f.write_text("stepz: 10\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_yaml_config(f)
    f.write_text("weights:\n  gradient: 1\n")
    with pytest.raises(ConfigError, match="gradient"):
        load_yaml_config(f)
    f.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_config(f)


@pytest.mark.parametrize("kw", [dict(variant="lable"), dict(mode="x"), dict(steps=0), dict(batch_size=1),
                                dict(lr=0.0), dict(epsilon=-0.1), dict(device="tpu"),
                                dict(grad_mode="fast"), dict(grad_scope="conv"), dict(device=3), dict(seed="abc"),
                                dict(seed=1.5), dict(seed=True)])
def test_invalid_attack_settings(kw):
    with pytest.raises(ConfigError):
        AttackConfig(**kw)


@pytest.mark.parametrize("text,needle", [("device: 3", "device must be auto, cpu or cuda, got 3"),
                                         ("seed: abc", "seed must be an integer, got 'abc'"),
                                         ("seed: 2.0", None)])
def test_yaml_values_of_the_wrong_type_are_config_errors(tmp_path, text, needle):
    f = tmp_path / "a.yaml"
    f.write_text(text + "\n")
    if needle is None:  # an integral float is an integer
        assert load_yaml_config(f).seed == 2
        return
    with pytest.raises(ConfigError) as exc:
        load_yaml_config(f)
    assert needle in str(exc.value) and str(f) in str(exc.value)


def test_image_priors_are_off_by_default_and_outside_the_nine():
    cfg = AttackConfig()
    assert (cfg.bn, cfg.jitter, cfg.flip) == (0.0, 0, False)
    assert {"bn", "jitter", "flip"} <= set(cfg.flat()) and "bn" not in LossWeights.names()
    assert cfg.term_weights() == {**cfg.effective_weights.as_dict(), "bn": 0.0}
    c = AttackConfig.from_flat({"bn": 1, "jitter": 2.0, "flip": True})
    assert (c.bn, c.jitter, c.flip) == (1.0, 2, True) and isinstance(c.jitter, int)
    assert AttackConfig(mode="inversion", bn=0.5).term_weights()["bn"] == 0.5


@pytest.mark.parametrize("kw, word", [(dict(bn=-0.1), "bn"), (dict(bn=float("nan")), "bn"), (dict(jitter=-1), "jitter"),
                                      (dict(jitter=1.5), "jitter"), (dict(flip="yes"), "flip"), (dict(bn=True), "bn")])
def test_invalid_image_prior_settings(kw, word):
    with pytest.raises(ConfigError, match=word):
        AttackConfig(**kw)
