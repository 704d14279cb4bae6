"""Precision (bf16 on CPU; fp16/bf16 on CUDA) against fp32, SDPA attention everywhere, and torch.compile against eager.

Tolerances, one pass of the bundled toy student, 4 images: latents within 5 % (relative L2) of fp32 (measured on
CPU bf16: 1.5 %), decoded images within 0.01 mean absolute difference on [0, 1] (measured: 0.002).
"""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image
from torch.overrides import TorchFunctionMode

from loopfree.pipelines.generate import generate_images
from loopfree.pipelines.loading import load_pipeline
from loopfree.method.runtime import EAGER, compile_unet, passes, prepare_pipeline
from loopfree.method.sampler import Conditioning, loop_free
from loopfree.method.schedule import NoiseSchedule
from loopfree.utils.seeding import initial_noise
from loopfree.toy.assets import bundled
from tiny import make_pipeline, make_scheduler, make_unet

PROMPTS = ["a red circle on a white background, left", "a small blue square"] * 2
LATENT_TOL, IMAGE_TOL = 0.05, 0.01
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sample(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    pipe = prepare_pipeline(load_pipeline(str(bundled("student")), dtype=dtype), torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    latents = initial_noise(range(len(PROMPTS)), (4, 16, 16), device, dtype)
    with torch.no_grad():
        x0 = pipe(PROMPTS, latents=latents, output_type="latent").images
        return x0.float().cpu(), pipe.decode(x0, "np")


@pytest.fixture(scope="module")
def fp32():
    return _sample("cpu", torch.float32)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=GPU),
    pytest.param("cuda", torch.bfloat16, marks=GPU),
])
def test_low_precision_one_pass_is_close_to_fp32(fp32, device, dtype):
    x0, images = _sample(device, dtype)
    assert ((x0 - fp32[0]).norm() / fp32[0].norm()).item() <= LATENT_TOL
    assert np.abs(images - fp32[1]).mean() <= IMAGE_TOL
    assert not np.array_equal(images, fp32[1])  # it did run in another precision


def test_generate_in_bf16_writes_images_close_to_fp32(tmp_path):
    pngs = {}
    for dtype in ("fp32", "bf16"):
        folder = generate_images(PROMPTS[0], out=str(tmp_path / dtype), images_per_prompt=2, dtype=dtype, device="cpu")
        pngs[dtype] = [np.asarray(Image.open(folder / f"00{i}.png"), dtype=np.float32) / 255 for i in range(2)]
    for a, b in zip(pngs["fp32"], pngs["bf16"]):
        assert np.abs(a - b).mean() <= IMAGE_TOL


@contextmanager
def _count_calls(*functions):
    """How often each torch function is called (at the Python level, so F.scaled_dot_product_attention itself)."""
    counts = {f: 0 for f in functions}

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in counts:
                counts[func] += 1
            return func(*args, **(kwargs or {}))

    with Mode():
        yield counts


@pytest.mark.parametrize("kind", ["toy", "sdxl"])
def test_pipelines_attend_with_sdpa_everywhere(kind, tmp_path):
    if kind == "toy":
        path = bundled("student")
    else:
        make_pipeline(tmp_path, "sdxl").save_pretrained(tmp_path / "model")
        path = tmp_path / "model"
    pipe = prepare_pipeline(load_pipeline(str(path)), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    attentions = [m for part in (pipe.unet, pipe.vae) for m in part.modules() if isinstance(m, Attention)]
    assert attentions and all(type(m.processor) is AttnProcessor2_0 for m in attentions)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    assert all(e.config._attn_implementation == "sdpa" for e in encoders)
    encoder_calls = []
    hooks = [e.register_forward_hook(lambda m, args, out: encoder_calls.append(m.config.num_hidden_layers)) for e in encoders]
    with torch.no_grad(), _count_calls(F.scaled_dot_product_attention, torch.baddbmm, torch.bmm, F.softmax,
                                       torch.Tensor.softmax) as counts:
        pipe(["a red cat"], guidance_scale=2.0, output_type="np", num_inference_steps=4, height=32, width=32)
    for h in hooks:
        h.remove()
    # every UNet attention once (the K decoders and both guidance halves are one batch), the VAE decoder's, and every
    # text-encoder layer per encoder call; nothing falls back to the bmm-softmax path
    called_attentions = sum(isinstance(m, Attention) for m in [*pipe.unet.modules(), *pipe.vae.decoder.modules()])
    assert counts.pop(F.scaled_dot_product_attention) == called_attentions + sum(encoder_calls) > len(encoder_calls)
    assert set(counts.values()) == {0}


def _recording_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph as it is: tests the capture, not a code generator

    return backend


def test_compiled_unet_equals_eager_and_keeps_static_shapes():
    """torch.compile with a recording backend (Inductor takes minutes on a small CPU; the graphs are what we test)."""
    unet, graphs = make_unet("sd2"), []
    schedule, ts = NoiseSchedule.from_scheduler(make_scheduler()), [751, 501, 251, 1]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), Conditioning(torch.randn(2, 5, 16, generator=g))
    with torch.no_grad():
        ref, ref_full = loop_free(unet, schedule, x, ts, c)[0], unet(x, 751, c.text).sample
        compile_unet(unet, backend=_recording_backend(graphs))
        assert passes(unet) is not EAGER
        out, full = loop_free(unet, schedule, x, ts, c)[0], unet(x, 751, c.text).sample
        captured = len(graphs)
        loop_free(unet, schedule, x, ts, c)
        assert len(graphs) == captured >= 3  # encoder, decoder, full forward; the same shapes reuse them
        loop_free(unet, schedule, x[:1], ts, Conditioning(c.text[:1]))
        assert len(graphs) > captured  # static shapes: a new batch size compiles again
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert ((full - ref_full).norm() / ref_full.norm()).item() <= 1e-5


def test_prepared_pipeline_compiled_with_aot_autograd_equals_eager(tmp_path):
    """The pipeline path end to end through torch.compile's AOTAutograd (backend "aot_eager": no code generation)."""
    make_pipeline(tmp_path, "sd").save_pretrained(tmp_path / "model")
    images = []
    for compile in (False, True):
        pipe = prepare_pipeline(load_pipeline(str(tmp_path / "model")), torch.device("cpu"), compile, backend="aot_eager")
        pipe.set_progress_bar_config(disable=True)
        latents = initial_noise([0, 1], (4, 8, 8), "cpu", torch.float32)
        images.append(pipe(["a red cat", "a dog"], latents=latents, guidance_scale=2.0, output_type="latent").images)
    assert ((images[1] - images[0]).norm() / images[0].norm()).item() <= 1e-5
