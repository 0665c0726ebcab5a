"""Generator conditioning invariants and classifier shapes."""
import pytest
import torch

from tldr_core.attack.config import VARIANTS
from tldr_core.attack.models import (MLP, ConditionedGenerator, PaperCNN, balanced_conditioning, hot_matrix,
                              sample_conditioning)


def test_soft_vectors_encode_their_argmax_and_hot_vectors_are_one_hot():
    g = torch.Generator().manual_seed(0)
    v, y = sample_conditioning(256, 10, "inversion", g)
    assert torch.equal(v.argmax(1), y)
    assert torch.allclose(v.sum(1), torch.ones(256)) and (v < 1).all()  # soft: never fully one-hot
    v, y = sample_conditioning(256, 10, "reconstruction", g)
    assert torch.equal(v.argmax(1), y) and torch.equal(v.max(1).values, torch.ones(256)) and v.sum().item() == 256


def test_hot_matrix_row_and_column_of_the_label():
    m = hot_matrix(torch.tensor([2, 0]), 4)
    assert m.shape == (2, 1, 4, 4)
    for i, k in enumerate([2, 0]):
        assert m[i, 0, k, :].eq(1).all() and m[i, 0, :, k].eq(1).all()
        assert m[i, 0].sum().item() == 2 * 4 - 1   # everything else zero
        # the encoded label is recoverable from the matrix alone
        assert m[i, 0].sum(0).argmax().item() == k == m[i, 0].sum(1).argmax().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_generator_shapes_and_conditioning_matters(variant, shape):
    torch.manual_seed(0)
    gen = ConditionedGenerator(variant, 10, shape, latent_dim=8, dropout=0.0, width=16).eval()
    v, y = balanced_conditioning(2, 10)
    z = torch.randn(1, 8).expand(20, 8)  # same latent for every sample: differences come from conditioning
    out = gen(z, v, y)
    assert out.shape == (20, *shape)
    assert not torch.allclose(out[0], out[-1]), "the conditioning must reach the image"


def test_matrix_variant_ignores_the_vector_and_vector_variant_ignores_nothing():
    torch.manual_seed(0)
    gen = ConditionedGenerator("matrix", 10, (1, 28, 28), latent_dim=8, width=16).eval()
    z = torch.randn(3, 8)
    y = torch.tensor([1, 2, 3])
    a = gen(z, torch.softmax(torch.randn(3, 10), 1), y)
    b = gen(z, torch.softmax(torch.randn(3, 10), 1), y)
    assert torch.equal(a, b)  # only the hot matrix (the label) conditions it


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (1, 64, 48)])
def test_classifiers_for_various_image_sizes(shape):
    for model in (PaperCNN(shape, 7, width=4, hidden=8), MLP(shape, 7, hidden=16), MLP(shape, 7)):
        x = torch.rand(3, *shape)
        assert model.eval()(x).shape == (3, 7)
        assert torch.allclose(model.head(model.features(x)), model(x))
