"""The analyses' building blocks against independent references: feature capture against split.run_encoder/decode and
diffusers' forward, cosine similarity by hand, moments against scipy, KL by hand, interpolation endpoints against
the prompts' own images."""

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDIMScheduler

from loopfree.analysis.capture import AdjacentSimilarity, StepFeatures, cosine_rows, unet_features
from loopfree.analysis.common import analysis_latents, per_image, quality_for
from loopfree.analysis.features import similarity_rows
from loopfree.analysis.interpolate import interpolation_latents, lerp, slerp
from loopfree.analysis.noise import moments, statistics
from loopfree.analysis.settings import AnalysisSetup
from loopfree.method.split import run_decoders, run_encoder
from tiny import make_pipeline, make_unet, sdxl_added_cond


def _hooked(unet):
    return sum(len(m._forward_hooks) for m in unet.modules())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_captured_features_are_the_split_tensors_and_diffusers_own(kind):
    unet = make_unet(kind)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    added = sdxl_added_cond(2) if kind == "sdxl" else None
    seen = []
    with torch.no_grad(), unet_features(unet, seen.append):
        feats = run_encoder(unet, x, 501, text, added)
        out = run_decoders(unet, feats, [501], hoist=False)[0]  # the hoisted path skips the up blocks' forward
        reference = unet(x, 501, text, added_cond_kwargs=added).sample  # diffusers' forward, the same hooks
    assert _hooked(unet) == 0 and len(seen) == 2
    split, forward = seen
    assert len(split.encoder) == 1 + len(feats.skips)
    assert all(torch.equal(a, b) for a, b in zip(split.encoder, [feats.mid, *feats.skips]))
    assert len(split.decoder) == len(unet.up_blocks)
    assert torch.equal(unet.conv_out(unet.conv_act(unet.conv_norm_out(split.decoder[-1]))), out)
    for a, b in zip(split.encoder + split.decoder, forward.encoder + forward.decoder):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(out, reference, atol=1e-5)


def test_cosine_similarity_by_hand():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [3.0, 4.0], [-2.0, 1.0]])
    assert torch.allclose(cosine_rows(a, b), torch.tensor([2**-0.5, 1.0, 0.0], dtype=torch.float64))
    x, y = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 5))
    want = [np.dot(p.ravel(), q.ravel()) / np.linalg.norm(p) / np.linalg.norm(q) for p, q in zip(x, y)]
    assert np.allclose(cosine_rows(torch.from_numpy(x), torch.from_numpy(y)).numpy(), want)


def test_adjacent_similarity_averages_pairs_rows_then_tensors():
    rng = np.random.default_rng(1)
    trajectories = [[[rng.normal(size=(2, 3)), rng.normal(size=(2, 6))] for _ in range(3)] for _ in range(2)]
    tracker = AdjacentSimilarity()
    for steps in trajectories:
        tracker.reset()
        for tensors in steps:
            tracker.update(StepFeatures([torch.from_numpy(t) for t in tensors], [torch.from_numpy(tensors[0])]))

    def cos(p, q):
        return np.dot(p, q) / np.linalg.norm(p) / np.linalg.norm(q)

    per_tensor = [np.mean([cos(s[k][j][r], s[k - 1][j][r]) for s in trajectories for k in (1, 2) for r in (0, 1)]) for j in (0, 1)]
    assert np.allclose(tracker.per_tensor("encoder"), per_tensor)
    assert tracker.mean("encoder") == pytest.approx(np.mean(per_tensor))
    assert tracker.mean("decoder") == pytest.approx(per_tensor[0])
    assert AdjacentSimilarity().mean("encoder") is None  # no adjacent steps


def test_moments_match_scipy_and_kl_matches_the_formula():
    values = np.random.default_rng(2).gamma(2.0, size=(3, 2, 4, 5, 5))
    m = moments(values)
    assert m["mean"] == pytest.approx(values.mean()) and m["std"] == pytest.approx(values.std())
    assert m["skew"] == pytest.approx(scipy.stats.skew(values.ravel()))
    assert m["excess_kurtosis"] == pytest.approx(scipy.stats.kurtosis(values.ravel()))
    stats = statistics(torch.from_numpy(values).float())
    items = values.reshape(6, -1)
    mu, s2 = items.mean(1), items.var(1, ddof=1)
    assert stats["kl_per_item"] == pytest.approx(np.mean(0.5 * (mu**2 + s2 - np.log(s2) - 1)), rel=1e-5)
    assert stats["items"] == 6


def test_interpolations_hit_their_endpoints():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    for mix in (lerp, slerp):
        assert torch.equal(mix(a, b, 0.0), a) and torch.equal(mix(a, b, 1.0), b)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(e1, e2, 0.5), torch.tensor([2**-0.5, 2**-0.5]))
    assert torch.allclose(slerp(e1, e2, 1 / 3), torch.tensor([np.cos(np.pi / 6), np.sin(np.pi / 6)], dtype=torch.float32))
    assert torch.allclose(lerp(e1, e2, 0.5), torch.tensor([0.5, 0.5]))


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request, tmp_path_factory):
    pipe = make_pipeline(tmp_path_factory.mktemp(request.param), request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method, mode, guidance", [("slerp", "loop_free", 1.0), ("lerp", "loop", 2.0)])
def test_interpolation_endpoints_are_the_prompts_own_images(pipe, method, mode, guidance):
    setup = AnalysisSetup(guidance=guidance)
    plan = pipe.plan_steps(mode, 3 if mode == "loop" else None)
    grid = interpolation_latents(pipe, "a red cat", "a blue dog", [0.0, 0.5, 1.0], method, mode, plan, setup, rows=2)
    x_T = analysis_latents(pipe, 1, AnalysisSetup(images_per_prompt=2))
    for prompt, column in (("a red cat", 0), ("a blue dog", 2)):
        own = pipe([prompt] * 2, latents=x_T, mode=mode, num_inference_steps=plan.num_steps, guidance_scale=guidance,
                   output_type="latent").images
        assert torch.allclose(grid[:, column], own, atol=1e-5)
    assert not torch.allclose(grid[:, 1], grid[:, 0], atol=1e-3)


def test_feature_similarity_equals_brute_force_over_the_ddim_loop(pipe):
    """Per N: the mean over tensors of the adjacent-step cosine similarity, recomputed from every step's features
    of diffusers' own DDIM loop, one trajectory per batch."""
    setup = AnalysisSetup(num_prompts=2, images_per_prompt=1, guidance=2.0, batch_size=1)
    prompts = ["a red cat", "a blue dog"]
    (n1, n3) = similarity_rows(pipe, [1, 3], setup, prompts)
    assert n1["encoder_similarity"] is None and n1["decoder_similarity"] is None and n3["steps"] == 3

    x_T = analysis_latents(pipe, 2, setup)
    sims = {"encoder": [], "decoder": []}
    for p, prompt in enumerate(prompts):
        steps = []
        cond, uncond = pipe.encode_conditioning([prompt], None, 1, True, "cpu", (16, 16))
        text = torch.cat([uncond.text, cond.text])
        added = None if cond.added is None else {k: torch.cat([uncond.added[k], cond.added[k]]) for k in cond.added}
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(3)
        x = x_T[p : p + 1]
        with torch.no_grad(), unet_features(pipe.unet, steps.append):
            for t in sched.timesteps:
                out = pipe.unet(torch.cat([x, x]), t, text, added_cond_kwargs=added).sample
                x = sched.step(out[:1] + 2.0 * (out[1:] - out[:1]), t, x).prev_sample
        for part in sims:
            tensors = [getattr(s, part) for s in steps]
            sims[part].append([[cosine_rows(a, b).mean().item() for a, b in zip(tensors[k], tensors[k - 1])] for k in (1, 2)])
    for part in sims:
        assert n3[f"{part}_per_tensor"] == pytest.approx(np.mean(sims[part], axis=(0, 1)), rel=1e-4)
        assert n3[f"{part}_similarity"] == pytest.approx(np.mean(sims[part]), rel=1e-4)


def test_quality_only_for_toy_world_models(pipe):
    assert quality_for(pipe, per_image(["a red cat"], AnalysisSetup())) is None


def test_image_grid_labels_columns_and_enlarges():
    from PIL import Image

    from loopfree.utils.images import LINE, image_grid

    tiles = [[Image.new("RGB", (8, 8), (10 * i, 20 * j, 200)) for j in range(3)] for i in range(2)]
    plain = image_grid(tiles)
    assert plain.size == (24, 16) and plain.getpixel((9, 9)) == (10, 20, 200)
    grid = image_grid(tiles, ["row a", "row b"], ["w=0", "w=.5", "w=1"], "a title", scale=2)
    margin = grid.width - 3 * 16
    assert grid.height == 2 * LINE + 2 * 16 and margin > 16
    assert grid.getpixel((margin + 2 * 16 + 1, 2 * LINE + 16 + 15)) == (10, 40, 200)  # row 1, column 2, still 16 px wide
