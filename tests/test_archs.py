"""The benchmark architectures are the real ones: their published UNet parameter counts."""

import pytest

from loopfree.archs import ARCHS, parameter_count


@pytest.mark.parametrize("name, count", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_parameter_counts_match_the_released_unets(name, count):
    assert parameter_count(ARCHS[name]) == count
