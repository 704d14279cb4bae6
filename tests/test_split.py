"""The encoder/decoder split reproduces the full UNet exactly."""

import pytest
import torch

from loopfree.method.split import run_decoders, run_encoder
from tiny import make_unet, sdxl_added_cond


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (5, 8)])  # 5 is not a multiple of the up factor 2
def test_decode_of_encode_equals_unet(kind, batch, size):
    unet = make_unet(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, *size, generator=g)
    c = torch.randn(batch, 5, 16, generator=g)
    cond = sdxl_added_cond(batch) if kind == "sdxl" else None
    t = torch.tensor(501)
    with torch.no_grad():
        ref = unet(x, t, c, added_cond_kwargs=cond).sample
        out = run_decoders(unet, run_encoder(unet, x, t, c, cond), torch.tensor([501]))
    assert out.shape == (1, *ref.shape)
    assert _rel_err(out[0], ref) <= 1e-5


def test_odd_latent_size_uses_upsample_size_path():
    unet = make_unet("sd")
    x, c = torch.randn(2, 4, 7, 9), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = unet(x, 10, c).sample
        out = run_decoders(unet, run_encoder(unet, x, 10, c), [10])[0]
    assert out.shape == ref.shape == (2, 4, 7, 9)
    assert _rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_batched_decoders_equal_separate_calls(kind):
    unet = make_unet(kind)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    cond = sdxl_added_cond(2) if kind == "sdxl" else None
    ts = [751, 501, 251, 1]
    with torch.no_grad():
        feats = run_encoder(unet, x, ts[0], c, cond)
        batched = run_decoders(unet, feats, ts)
        separate = torch.stack([run_decoders(unet, feats, [t])[0] for t in ts])
    assert batched.shape == (4, 2, 4, 8, 8)
    assert _rel_err(batched, separate) <= 1e-5
    # different timesteps really give different decoder outputs
    assert _rel_err(batched[0], batched[3]) > 1e-3


def test_sdxl_added_conditioning_reaches_every_decoder():
    unet = make_unet("sdxl")
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    cond_a, cond_b = sdxl_added_cond(1, seed=1), sdxl_added_cond(1, seed=2)
    with torch.no_grad():
        feats = run_encoder(unet, x, 751, c, cond_a)
        out_a = run_decoders(unet, feats, [751, 251])
        feats.added_emb = run_encoder(unet, x, 751, c, cond_b).added_emb  # same skips, other added conditioning
        out_b = run_decoders(unet, feats, [751, 251])
    assert _rel_err(out_a[1], out_b[1]) > 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_decoder_has_gradient_wrt_encoder(checkpointing):
    unet = make_unet("sd").train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    x, c = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 5, 16)
    feats = run_encoder(unet, x, 751, c)
    eps = run_decoders(unet, feats, [751, 501, 251, 1])
    for k in range(4):
        (g,) = torch.autograd.grad(eps[k].sum(), feats.mid, retain_graph=True)
        assert g.abs().sum() > 0
        (gw,) = torch.autograd.grad(eps[k].sum(), unet.conv_in.weight, retain_graph=True)
        assert gw.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        unet = make_unet("sd").train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        x, c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.ones(2, 5, 16)
        run_decoders(unet, run_encoder(unet, x, 751, c), [751, 1]).square().mean().backward()
        grads.append(unet.conv_in.weight.grad.clone())
    assert _rel_err(grads[1], grads[0]) <= 1e-5
