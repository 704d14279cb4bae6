"""The hoisted decoders equal the plain ones (every up block called as diffusers does on K-fold tiled inputs)."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from loopfree.method.hoist import SHARED_TEXT, unsupported
from loopfree.method.sampler import Conditioning, Generator, loop_free
from loopfree.method.schedule import NoiseSchedule
from loopfree.method.split import EncoderFeatures, run_decoders, run_encoder
from tiny import make_scheduler, make_unet, sdxl_added_cond, unet_config

TS = [751, 501, 251, 1]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _variant(kind: str) -> UNet2DConditionModel:
    """A tiny UNet of ``kind``; "scale_shift": SD-like with scale-shift time embeddings, a non-unit output scale,
    skip_time_act and dropout (exercised in train mode)."""
    if kind != "scale_shift":
        return make_unet(kind)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sd"), resnet_time_scale_shift="scale_shift", dropout=0.2)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for block in unet.up_blocks:
        for resnet in block.resnets:
            resnet.output_scale_factor, resnet.skip_time_act = 2.0, True
    return unet.eval()


@pytest.fixture(scope="module", params=["sd", "sd2", "sdxl", "scale_shift"])
def unet(request):
    return _variant(request.param)


def _inputs(unet, batch: int, size=(8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(batch, 4, *size, generator=g), torch.randn(batch, 5, 16, generator=g)
    added = sdxl_added_cond(batch) if unet.config.addition_embed_type == "text_time" else None
    return x, c, added


def _leaf_features(feats: EncoderFeatures) -> EncoderFeatures:
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
    return EncoderFeatures(leaf(feats.mid), tuple(leaf(s) for s in feats.skips), leaf(feats.context),
                           leaf(feats.added_emb), feats.sample_size)


def _grads(unet, feats: EncoderFeatures, hoist: bool, weights: torch.Tensor) -> tuple[torch.Tensor, list]:
    inputs = [feats.mid, *feats.skips, feats.context] + ([feats.added_emb] if feats.added_emb is not None else [])
    params = [p for p in unet.parameters()]
    torch.manual_seed(5)  # dropout masks: the same draws in the same order on both paths
    out = run_decoders(unet, feats, TS, hoist=hoist)
    return out, torch.autograd.grad((out * weights).sum(), inputs + params, allow_unused=True)


# 16×16: small up blocks take their input whole, large ones split it (MIN_PIXELS), upsamplers run at low resolution;
# 15×17: not a multiple of the up factor (explicit upsample sizes); 8×8: every block under MIN_PIXELS
SIZES = [(1, (16, 16)), (2, (15, 17)), (3, (8, 8))]


@pytest.mark.parametrize("batch, size", SIZES)
def test_hoisted_equals_plain_without_gradients(unet, batch, size):
    assert unsupported(unet) is None
    x, c, added = _inputs(unet, batch, size)
    with torch.no_grad():
        feats = run_encoder(unet, x, TS[0], c, added)
        plain, hoisted = run_decoders(unet, feats, TS, hoist=False), run_decoders(unet, feats, TS)
    with torch.inference_mode():
        inference = run_decoders(unet, run_encoder(unet, x, TS[0], c, added), TS)
    assert hoisted.shape == plain.shape == (4, batch, 4, *size)
    assert _rel_err(hoisted, plain) <= 1e-5
    assert _rel_err(inference, plain) <= 1e-5
    assert _rel_err(plain[0], plain[3]) > 1e-3  # the decoders really differ


@pytest.mark.parametrize("checkpointing, batch, size", [(False, *SIZES[0]), (False, *SIZES[1]), (True, *SIZES[1])])
def test_hoisted_equals_plain_with_gradients(unet, checkpointing, batch, size):
    """Outputs and the gradients w.r.t. every encoder feature and every UNet parameter, train mode."""
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        x, c, added = _inputs(unet, batch, size)
        feats = _leaf_features(run_encoder(unet, x, TS[0], c, added))
        weights = torch.randn(4, batch, 4, *size, generator=torch.Generator().manual_seed(1))
        plain, g_plain = _grads(unet, feats, False, weights)
        hoisted, g_hoisted = _grads(unet, feats, True, weights)
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
    assert _rel_err(hoisted, plain) <= 1e-5
    assert [g is None for g in g_hoisted] == [g is None for g in g_plain]
    used = [(a, b) for a, b in zip(g_hoisted, g_plain) if b is not None]
    assert len(used) > len(list(unet.up_blocks.parameters()))  # the decoder's parameters and all features
    for a, b in used:
        assert _rel_err(a, b) <= 1e-4 if b.norm() > 1e-6 else a.norm() <= 1e-6


def test_gradients_reach_the_encoder_equally():
    unet = make_unet("sdxl").train()
    x, c, added = _inputs(unet, 2)
    grads = []
    for hoist in (False, True):
        unet.zero_grad()
        run_decoders(unet, run_encoder(unet, x, TS[0], c, added), TS, hoist=hoist).square().mean().backward()
        grads.append([unet.conv_in.weight.grad.clone(), unet.add_embedding.linear_1.weight.grad.clone()])
    for a, b in zip(*grads):
        assert b.abs().sum() > 0 and _rel_err(a, b) <= 1e-5


@contextmanager
def _record_rows(modules: dict[str, torch.nn.Module]):
    """Rows (first dimension) of each named module's first input, per call."""
    rows: dict[str, list[int]] = {name: [] for name in modules}

    def hook(name, args, kwargs):
        rows[name].append((args[0] if args else kwargs["hidden_states"]).shape[0])

    handles = [m.register_forward_pre_hook(lambda m, a, kw, name=name: hook(name, a, kw), with_kwargs=True)
               for name, m in modules.items()]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def test_shared_work_runs_once_per_batch():
    """B rows, not K·B, reach the first up-block conv1/shortcut and every cross-attention's to_k/to_v; a large later
    ResNet's conv1 runs split (not as the module), a small one whole on K·B rows (MIN_PIXELS)."""
    unet = make_unet("sd2")
    x, c, _ = _inputs(unet, 1, (16, 16))
    attn2 = [tb.attn2 for blk in unet.up_blocks for t in getattr(blk, "attentions", []) for tb in t.transformer_blocks]
    first = unet.up_blocks[0].resnets[0]
    shared = {"conv1": first.conv1, "shortcut": first.conv_shortcut,
              **{f"to_k{i}": a.to_k for i, a in enumerate(attn2)}, **{f"to_v{i}": a.to_v for i, a in enumerate(attn2)}}
    others = {"up block": unet.up_blocks[0], "small conv1": unet.up_blocks[0].resnets[1].conv1,
              "large conv1": unet.up_blocks[1].resnets[0].conv1}
    with torch.no_grad():
        feats = run_encoder(unet, x, TS[0], c)
        with _record_rows({**shared, **others}) as rows:
            run_decoders(unet, feats, TS)
        assert all(rows[name] == [1] for name in shared), rows
        assert (rows["up block"], rows["small conv1"], rows["large conv1"]) == ([], [4], [])
        with _record_rows({**shared, **others}) as rows:
            run_decoders(unet, feats, TS, hoist=False)
        assert all(r == [4] for r in rows.values()), rows
    assert all(type(a.processor) is AttnProcessor2_0 for a in attn2)  # restored after the call


def test_text_states_are_tiled_when_checkpointing_will_recompute_attention():
    unet = make_unet("sd2").train()
    unet.enable_gradient_checkpointing()
    x, c, _ = _inputs(unet, 2)
    to_k = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    with _record_rows({"to_k": to_k}) as rows:
        run_decoders(unet, run_encoder(unet, x, TS[0], c), TS).sum().backward()
    assert rows["to_k"] == [8, 8]  # forward and its recomputation in backward, both with the tiled text


def test_shared_text_processor_equals_sdpa_processor():
    attn = make_unet("sd2").up_blocks[1].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(3 * 2, 10, attn.query_dim, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, hidden, text.repeat(3, 1, 1))
        assert _rel_err(SHARED_TEXT(attn, hidden, text), ref) <= 1e-6
        assert _rel_err(SHARED_TEXT(attn, hidden[:2], text), ref[:2]) <= 1e-6  # K = 1


def _unet_with(**changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**unet_config("sd"), **changes}).eval()


def _freeu() -> UNet2DConditionModel:
    unet = make_unet("sd")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.1, b2=1.2)
    return unet


def _reflect_padded() -> UNet2DConditionModel:
    unet = make_unet("sd")
    unet.up_blocks[1].resnets[0].conv1.padding_mode = "reflect"
    return unet


def _unfused_conv_lora() -> UNet2DConditionModel:
    """A LoRA student's UNet as loaded, unfused: peft wraps conv1 (its weight is no longer all it computes)."""
    from peft import LoraConfig

    unet = make_unet("sd")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["conv1"], init_lora_weights=False))
    return unet


UNSUPPORTED = {
    "not a plain Conv2d": _unfused_conv_lora,  # before: an AttributeError (peft's Conv2d has no .groups)
    "ResnetUpsampleBlock2D": lambda: _unet_with(up_block_types=("ResnetUpsampleBlock2D", "CrossAttnUpBlock2D")),
    "SimpleCrossAttnUpBlock2D": lambda: _unet_with(up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D")),
    "FreeU": _freeu,
    "non-zero-padded": _reflect_padded,
}


@pytest.mark.parametrize("reason", list(UNSUPPORTED))
def test_unsupported_unets_name_the_reason_and_decode_plainly(reason):
    unet = UNSUPPORTED[reason]()
    assert reason in unsupported(unet)
    x, c, _ = _inputs(unet, 2)
    with torch.no_grad(), _record_rows({"up block": unet.up_blocks[-1]}) as rows:
        out = run_decoders(unet, run_encoder(unet, x, TS[2], c), TS)  # decoder 2 runs at the encoder's timestep
        ref = unet(x, TS[2], c).sample
    assert rows["up block"] == [8, 2]  # the plain path ran (then the full UNet)
    assert _rel_err(out[2], ref) <= 1e-5


def test_only_cross_attention_keeps_text_tiled_and_stays_exact():
    unet = _unet_with(only_cross_attention=True)
    x, c, _ = _inputs(unet, 2)
    with torch.no_grad():
        feats = run_encoder(unet, x, TS[0], c)
        assert _rel_err(run_decoders(unet, feats, TS), run_decoders(unet, feats, TS, hoist=False)) <= 1e-5


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_one_pass_student_hoisted_equals_plain(guidance):
    unet = make_unet("sdxl")
    schedule = NoiseSchedule.from_scheduler(make_scheduler())
    x_T, c, added = _inputs(unet, 2)
    cond, uncond = Conditioning(c, added), Conditioning(torch.zeros_like(c), added)
    with torch.no_grad():
        x0, eps = loop_free(unet, schedule, x_T, TS, cond, uncond, guidance)
        x0_p, eps_p = loop_free(unet, schedule, x_T, TS, cond, uncond, guidance, hoist=False)
    assert _rel_err(x0, x0_p) <= 1e-5 and _rel_err(eps, eps_p) <= 1e-5


def test_generator_hoisted_equals_plain_with_gradients():
    unet = make_unet("sd").train()
    schedule = NoiseSchedule.from_scheduler(make_scheduler())
    x_T, c, _ = _inputs(unet, 2)
    results = []
    for hoist in (True, False):
        unet.zero_grad()
        x0, eps = Generator(unet, schedule, TS, hoist=hoist)(x_T, c)
        (x0.square().mean() + eps.mean()).backward()
        results.append([x0.detach(), eps.detach()] + [p.grad.clone() for p in unet.parameters()])
    for a, b in zip(*results):
        assert _rel_err(a, b) <= 1e-5 if b.norm() > 1e-6 else a.norm() <= 1e-6


def test_upsamplers_run_at_low_resolution_unless_the_size_is_explicit():
    unet = make_unet("sd")
    upsampler = unet.up_blocks[0].upsamplers[0]
    # the plain path calls it; the hoisted one too with an explicit size (odd latent) or under MIN_PIXELS
    for size, module_calls in (((16, 16), 1), ((15, 17), 2), ((8, 8), 2)):
        x, c, _ = _inputs(unet, 1, size)
        with torch.no_grad(), _record_rows({"upsampler": upsampler}) as rows:
            feats = run_encoder(unet, x, TS[0], c)
            hoisted, plain = run_decoders(unet, feats, TS), run_decoders(unet, feats, TS, hoist=False)
        assert len(rows["upsampler"]) == module_calls
        assert _rel_err(hoisted, plain) <= 1e-5
