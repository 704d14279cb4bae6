"""The benchmark architectures are the real ones: the published parameter counts of their UNets, text encoders, VAEs."""

import pytest

from loopfree.bench.archs import ARCHS, parameter_count

CLIP_L, OPENCLIP_H, OPENCLIP_BIGG_PROJ, SD_VAE = 123_060_480, 340_387_840, 694_659_840, 83_653_863


@pytest.mark.parametrize("name, count", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_parameter_counts_match_the_released_unets(name, count):
    assert parameter_count(ARCHS[name]) == count


@pytest.mark.parametrize("name, counts", [("sd15", [CLIP_L]), ("sd21", [OPENCLIP_H]), ("sdxl", [CLIP_L, OPENCLIP_BIGG_PROJ])])
def test_parameter_counts_match_the_released_text_encoders_and_vae(name, counts):
    assert parameter_count(ARCHS[name], "text_encoders") == counts
    assert parameter_count(ARCHS[name], "vae") == SD_VAE


@pytest.mark.parametrize("name", list(ARCHS))
def test_text_encoders_feed_the_unet(name):
    """Text states as wide as the UNet's cross-attention; SDXL: pooled embedding + 6 time ids its added embedding."""
    arch = ARCHS[name]
    widths = [cfg["hidden_size"] for cfg in arch.text_encoders]
    assert sum(widths) == arch.unet["cross_attention_dim"]
    if arch.pooled_dim is not None:
        assert arch.text_encoders[-1]["projection_dim"] == arch.pooled_dim
        assert arch.pooled_dim + 6 * arch.unet["addition_time_embed_dim"] == arch.unet["projection_class_embeddings_input_dim"]
    assert all(cfg["max_position_embeddings"] == arch.text_len for cfg in arch.text_encoders)
