"""``loopfree export`` and the onnxruntime backend: the exported graph gives the PyTorch sampler's images (within
1/255) at every batch size, runs in a process that never imports torch, and bad input is refused before anything
is written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from loopfree.cli import main
from loopfree.export import exporter
from loopfree.export.exporter import export_student, pipeline_ids, save_tokenizer
from loopfree.export.runtime import ExportedStudent
from loopfree.pipelines.files import denoiser_sha256
from loopfree.pipelines.loading import load_pipeline
from loopfree.toy.assets import model_folder
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.seeding import initial_noise

from tiny import make_pipeline

PROMPTS = ["a red circle on a white background", "a green triangle", "two blue squares on a black background"]


def pipeline_images(pipe, prompts, x_T) -> np.ndarray:
    """The PyTorch pipeline's uint8 images, as diffusers' PIL conversion rounds them."""
    return np.stack([np.asarray(im) for im in pipe(prompts, latents=x_T).images])


def levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled toy student exported to ONNX (the slow part: once per module), and the student itself."""
    out = tmp_path_factory.mktemp("export") / "student"
    export_student(None, str(out), max_batch=4)
    return out, load_pipeline(str(model_folder(None)))


def test_the_exported_student_gives_the_pipelines_images_at_every_batch(bundled):
    out, pipe = bundled
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["source_sha256"] == denoiser_sha256(model_folder(None), with_record=True)
    assert manifest["decoder_timesteps"] == pipe.decoder_timesteps and manifest["check_max_diff"] <= 1
    student = ExportedStudent(out, threads=1)
    for n in (1, 3, 6):  # the export traced batch 2; 6 runs as two calls of the graph's largest batch, 4
        prompts = (PROMPTS * 2)[:n]
        x_T = initial_noise(list(range(n)), student.latent_shape)
        assert levels(student(prompts, x_T.numpy()), pipeline_images(pipe, prompts, x_T)) <= 1


def test_generate_with_onnxruntime_gives_the_torch_backends_images(bundled, tmp_path):
    out, _ = bundled
    args = ["generate", PROMPTS[0], "--images-per-prompt", "2", "--seed", "3"]
    torch_run = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "torch")])
    ort_run = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ort"), "--backend", "onnxruntime", "--model", str(out)])
    assert torch_run.exit_code == 0 and ort_run.exit_code == 0, (torch_run.output, ort_run.output)
    for name in ("000.png", "001.png"):
        assert levels(np.asarray(Image.open(tmp_path / "torch" / name)), np.asarray(Image.open(tmp_path / "ort" / name))) <= 1
    record = json.loads((tmp_path / "ort" / "generate.json").read_text())
    assert record["backend"] == "onnxruntime" and record["seeds"] == json.loads((tmp_path / "torch" / "generate.json").read_text())["seeds"]


def test_the_graph_runs_in_a_process_that_never_imports_torch(bundled, tmp_path):
    out, pipe = bundled
    x_T = initial_noise([5, 6], tuple(json.loads((out / "export.json").read_text())["latent_shape"]))
    np.save(tmp_path / "x_T.npy", x_T.numpy())
    script = f"""
import sys
for name in ("torch", "diffusers", "transformers"):
    sys.modules[name] = None  # any import of them fails
import numpy as np
from loopfree.export.runtime import ExportedStudent
images = ExportedStudent({str(out)!r})({PROMPTS[:2]!r}, np.load({str(tmp_path / 'x_T.npy')!r}))
np.save({str(tmp_path / 'images.npy')!r}, images)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert levels(np.load(tmp_path / "images.npy"), pipeline_images(pipe, PROMPTS[:2], x_T)) <= 1


def test_the_saved_tokenizer_gives_the_pipelines_ids_short_and_truncated(tmp_path):
    from tokenizers import Tokenizer

    tok = load_pipeline(str(model_folder(None))).tokenizer
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    prompts = ["", "a red circle", " ".join(["a big red circle"] * 20)]  # empty, padded, truncated
    saved = np.array([e.ids for e in Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode_batch(prompts)])
    assert np.array_equal(saved, pipeline_ids(tok, prompts).numpy())


def test_a_tiny_sdxl_student_exports_whole(tmp_path):
    """SDXL: two tokenizers and text encoders, pooled text and time ids built inside the graph."""
    make_pipeline(tmp_path, "sdxl").save_pretrained(tmp_path / "pipe")
    folder = export_student(str(tmp_path / "pipe"), str(tmp_path / "out"), max_batch=3)
    manifest = json.loads((folder / "export.json").read_text())
    assert list(manifest["inputs"]) == ["input_ids", "x_T", "input_ids_2"]
    prompts = ["a red cat", "the blue dog", "a green circle"]
    x_T = initial_noise([0, 1, 2], tuple(manifest["latent_shape"]))
    expected = pipeline_images(load_pipeline(str(tmp_path / "pipe")), prompts, x_T)
    got = ExportedStudent(folder)(prompts, x_T.numpy())
    assert got.shape == expected.shape and levels(got, expected) <= 1


def test_a_pt2_export_loads_back_and_gives_the_pipelines_images(tmp_path):
    make_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    folder = export_student(str(tmp_path / "pipe"), str(tmp_path / "pt2"), fmt="pt2", max_batch=3)
    pipe, prompts = load_pipeline(str(tmp_path / "pipe")), ["a red cat", "the blue dog", "a green circle"]
    x_T = initial_noise([0, 1, 2], pipe.latent_shape(16, 16))
    with torch.no_grad():
        got = torch.export.load(str(folder / "sampler.pt2")).module()(pipeline_ids(pipe.tokenizer, prompts), x_T).numpy()
    assert levels(got, pipeline_images(pipe, prompts, x_T)) <= 1


def test_an_export_that_does_not_match_pytorch_is_not_written(tmp_path, monkeypatch):
    """The gate alone: the trace and the save are stubbed, the saved graph's images are off by 4 levels."""
    make_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(torch.export, "export", lambda graph, inputs, **kw: graph)
    monkeypatch.setattr(torch.export, "save", lambda program, path: open(path, "wb").close())
    monkeypatch.setattr(exporter, "_run_saved", lambda fmt, path, names, inputs: graph_images(inputs) ^ np.uint8(4))
    graph_images = lambda inputs: exporter.SamplerGraph.from_pipeline(load_pipeline(str(tmp_path / "pipe")))(*inputs).numpy()
    with pytest.raises(LoopfreeError, match="differ from PyTorch's by 4/255"):
        export_student(str(tmp_path / "pipe"), str(tmp_path / "out"), fmt="pt2")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, bundled):
    out, _ = bundled
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cases = [
        (["export", "--model", str(tmp_path), "--out", str(tmp_path / "a")], "model_index.json"),
        (["export", "--out", str(tmp_path / "mine")], "not empty"),
        (["export", "--out", str(tmp_path / "a"), "--max-batch", "64"], "64"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(model_folder(None)), "--out", str(tmp_path / "a")], "not an exported student"),
        (["generate", "x", "--backend", "onnxruntime", "--out", str(tmp_path / "a")], "needs --model"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(out), "--steps", "2", "--out", str(tmp_path / "a")], "--steps does not apply"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(out), "--resolution", "32", "--out", str(tmp_path / "a")], "exported at 64x64"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert not (tmp_path / "a").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
