"""What an input may ask for (issue 24): KKT candidate counts against the data, the CNN's smallest image."""
import pytest

from tldr_core.attack.bounds import MAX_KKT_VALUES, check_kkt_candidates
from tldr_core.attack.config import ConfigError
from tldr_core.attack.kkt import KKTConfig
from tldr_core.attack.models import PaperCNN


def test_kkt_candidates_at_most_ten_times_the_training_images_per_class():
    check_kkt_candidates(20, 2, 10, (1, 8, 8))  # exactly 10 x
    with pytest.raises(ConfigError, match="21 candidates per class is more than 10 x the 2 training images per class"):
        check_kkt_candidates(21, 2, 10, (1, 8, 8))


def test_kkt_candidates_bounded_by_their_values():
    # 10 classes of 3x256x256 = 1,966,080 values per candidate-per-class; 2^28 // that = 136
    assert MAX_KKT_VALUES // (10 * 3 * 256 * 256) == 136
    check_kkt_candidates(136, 100, 10, (3, 256, 256))
    with pytest.raises(ConfigError, match="at most 136 per class"):
        check_kkt_candidates(137, 100, 10, (3, 256, 256))


def test_kkt_config_bounds_the_absolute_count():
    assert KKTConfig(per_class=1_000_000).per_class == 1_000_000
    with pytest.raises(ConfigError, match="per_class must be at most 1,000,000"):
        KKTConfig(per_class=1_000_001)


@pytest.mark.parametrize("side", [1, 3])
def test_the_cnn_refuses_images_below_4x4_naming_the_smallest(side):
    with pytest.raises(ConfigError, match=f"at least 4x4, got {side}x{side}"):
        PaperCNN((1, side, side), 2)
    assert PaperCNN((1, 4, 4), 2)(__import__("torch").zeros(2, 1, 4, 4)).shape == (2, 2)
