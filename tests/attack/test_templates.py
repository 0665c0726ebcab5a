"""The weight-template attack: it recovers class means from an SGD-trained linear model and nothing
from a random one; which layer it reads, and how templates are rendered."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tldr_core.attack.classifier import ClassifierSettings, train_classifier
from tldr_core.attack.data import DatasetBundle, Split
from tldr_core.scoring.metrics import score_baselines
from tldr_core.attack.models import MLP, PaperCNN
from tldr_core.attack.templates import (_class_probs, applies, class_directions, first_trainable_layer, render,
                                        weight_templates)
from tldr_core.scoring.pipeline import template_attack

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


K, S = 4, 16


def constructed_bundle(noise: float = 0.01, per_class: int = 25) -> DatasetBundle:
    """Each class is one fixed image (a smooth random blob in its own quadrant) plus small noise."""
    g = torch.Generator().manual_seed(0)
    blobs = F.interpolate(torch.rand(K, 1, S // 2, S // 2, generator=g), size=(S, S), mode="bilinear",
                          align_corners=False)
    masks = torch.zeros(K, 1, S, S)
    for k in range(K):
        r, c = divmod(k, 2)
        masks[k, :, r * S // 2:(r + 1) * S // 2, c * S // 2:(c + 1) * S // 2] = 1
    protos = (blobs * masks).clamp(0, 1)

    def split() -> Split:
        y = torch.arange(K).repeat(per_class)
        return Split((protos[y] + noise * torch.randn(len(y), 1, S, S, generator=g)).clamp(0, 1), y)

    return DatasetBundle("constructed", split(), split(), split(), K, (1, S, S), list("abcd"), "test")


@pytest.mark.slow
def test_templates_recover_class_means_of_sgd_linear_model_and_nothing_from_random_init():
    torch.manual_seed(0)
    b = constructed_bundle()
    model, meta = train_classifier(b, ClassifierSettings(arch="mlp", hidden=0, dropout=0.0, optimizer="sgd", lr=0.05,
                                                         epochs=30, batch_size=16), log=lambda s: None)
    assert meta["test_accuracy"] == 1.0
    base = score_baselines(b.train, b.heldout, b.test, K, 1)
    trained = template_attack(model, b)
    assert trained.method == "linear"
    m = trained.metrics
    assert m["quality"] > 0.85 and m["quality"] > 0.9 * base["class_mean"]["quality"]  # near 1: the class image
    assert m["label_agreement"] == 1.0 and m["coverage"] == 1.0
    assert trained.images.shape == (K, 1, S, S) and trained.labels.tolist() == list(range(K))
    assert 0 <= trained.images.min() and trained.images.max() <= 1
    torch.manual_seed(1)
    random = template_attack(MLP((1, S, S), K).eval(), b)
    assert random.metrics["quality"] < base["noise"]["quality"] + 0.1  # init noise: no better than noise
    assert m["quality"] - random.metrics["quality"] > 0.7


def test_attack_applies_only_when_the_first_trainable_layer_is_fully_connected():
    assert applies(MLP((1, 8, 8), 3, hidden=0)) and applies(MLP((1, 8, 8), 3, hidden=5))
    cnn = PaperCNN((1, 12, 12), 3, width=4, hidden=8)
    assert not applies(cnn) and isinstance(first_trainable_layer(cnn), nn.Conv2d)
    with pytest.raises(ValueError, match="fully connected first layer"):
        class_directions(cnn)


def test_linear_and_linear_path_directions():
    torch.manual_seed(0)
    lin = MLP((1, 4, 4), 3, hidden=0)
    d, method = class_directions(lin)
    assert method == "linear" and torch.equal(d, lin.out.weight.detach())
    mlp = MLP((1, 4, 4), 3, hidden=6)
    d, method = class_directions(mlp)
    assert method == "linear-path" and torch.allclose(d, mlp.out.weight.detach() @ mlp.fc[0].weight.detach())


def test_any_other_fully_connected_model_uses_the_jacobian_which_equals_the_linear_path_when_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Identity(), nn.Linear(5, 3)).eval()
    d, method = class_directions(model, (1, 4, 4))
    assert method == "jacobian" and d.shape == (3, 16)
    assert torch.allclose(d, model[3].weight.detach() @ model[1].weight.detach(), atol=1e-6)
    res = weight_templates(model, (1, 4, 4))
    assert res.images.shape == (3, 1, 4, 4)


def test_renderings_and_per_class_choice_by_classifier_probability():
    t = torch.tensor([[-2.0, 0.0, 1.0, 3.0]])
    assert torch.allclose(render(t, "minmax"), torch.tensor([[0.0, 0.4, 0.6, 1.0]]))
    assert torch.allclose(render(t, "positive"), torch.tensor([[0.0, 0.0, 1 / 3, 1.0]]))
    assert torch.allclose(render(-t, "positive"), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        render(t, "log")
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=4).eval()
    res = weight_templates(model)
    labels = torch.arange(3)
    d = res.directions.reshape(3, -1)
    for how in ("minmax", "positive"):
        for sign in (1, -1):
            p = _class_probs(model, render(sign * d, how).reshape(3, 1, 4, 4), labels)
            assert (res.class_prob >= p - 1e-6).all()  # the kept candidate is the classifier's favourite
    assert all(c[:-1] in ("minmax", "positive") and c[-1] in "+-" for c in res.choice)
