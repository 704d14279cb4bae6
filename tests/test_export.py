"""``loopfree export`` and the onnxruntime backend: the exported graph gives the PyTorch sampler's images (within
1/255) at every batch size, runs in a process that never imports torch, and bad input is refused before anything
is written."""

import io
import json
import shutil
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
    """SDXL: two tokenizers and text encoders, pooled text and time ids built inside the graph; and its int8."""
    make_pipeline(tmp_path, "sdxl").save_pretrained(tmp_path / "pipe")
    folder = export_student(str(tmp_path / "pipe"), str(tmp_path / "out"), max_batch=3)
    manifest = json.loads((folder / "export.json").read_text())
    assert list(manifest["inputs"]) == ["input_ids", "x_T", "input_ids_2"]
    prompts = ["a red cat", "the blue dog", "a green circle"]
    x_T = initial_noise([0, 1, 2], tuple(manifest["latent_shape"]))
    expected = pipeline_images(load_pipeline(str(tmp_path / "pipe")), prompts, x_T)
    got = ExportedStudent(folder)(prompts, x_T.numpy())
    assert got.shape == expected.shape and levels(got, expected) <= 1
    int8 = tmp_path / "int8"  # its int8 graph, beside the same tokenizers and manifest
    shutil.copytree(folder, int8, ignore=shutil.ignore_patterns("sampler.onnx*"))
    exporter.quantize_int8(folder / "sampler.onnx", int8 / "sampler.onnx")
    quantised = ExportedStudent(int8)(prompts, x_T.numpy())
    assert np.abs(quantised.astype(int) - expected.astype(int)).mean() <= exporter.INT8_MEAN_LEVELS


def test_a_static_pt2_export_loads_back_and_gives_the_pipelines_images(tmp_path):
    """--max-batch 1: a static graph (the ONNX tests cover the dynamic batch)."""
    make_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    folder = export_student(str(tmp_path / "pipe"), str(tmp_path / "pt2"), fmt="pt2", max_batch=1)
    pipe, prompts = load_pipeline(str(tmp_path / "pipe")), ["a red cat", "the blue dog"]
    x_T = initial_noise([0, 1], pipe.latent_shape(16, 16))
    module, ids = torch.export.load(str(folder / "sampler.pt2")).module(), pipeline_ids(pipe.tokenizer, prompts)
    with torch.no_grad():
        got = np.concatenate([module(ids[i:i + 1], x_T[i:i + 1]).numpy() for i in range(2)])
        with pytest.raises(Exception):  # its batch is fixed at 1
            module(ids, x_T)
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


def test_an_int8_export_quantises_the_matmuls_and_stays_within_its_mean_tolerance(bundled, tmp_path, monkeypatch):
    """The int8 path of export_student with the trace and the ONNX conversion stubbed (the bundled fp32 graph stands
    in for the conversion's output): quantised, checked by onnxruntime, published with its manifest."""
    import onnx

    out, pipe = bundled
    monkeypatch.setattr(torch.export, "export", lambda graph, inputs, **kw: graph)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: type("Program", (), {"save": lambda self, path: shutil.copy(out / "sampler.onnx", path)})())
    folder = export_student(None, str(tmp_path / "int8"), max_batch=4, quantize="int8")
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["quantize"] == "int8" and 0 < manifest["check_mean_diff"] <= exporter.INT8_MEAN_LEVELS
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "sampler.onnx", "tokenizer.json"]  # no fp32 left
    ops = {n.op_type for n in onnx.load(str(folder / "sampler.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear", "Conv"} <= ops and "ConvInteger" not in ops
    assert (folder / "sampler.onnx").stat().st_size < 0.85 * (out / "sampler.onnx").stat().st_size
    x_T = initial_noise([0, 1, 2], tuple(manifest["latent_shape"]))
    got, expected = ExportedStudent(folder)(PROMPTS, x_T.numpy()), pipeline_images(pipe, PROMPTS, x_T)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() <= exporter.INT8_MEAN_LEVELS and levels(got, expected) > 1


def test_an_int8_graph_too_far_from_pytorch_is_not_written(bundled, tmp_path, monkeypatch):
    out, _ = bundled
    monkeypatch.setattr(torch.export, "export", lambda graph, inputs, **kw: graph)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **kw: type("Program", (), {"save": lambda self, path: shutil.copy(out / "sampler.onnx", path)})())
    run = exporter._run_saved
    monkeypatch.setattr(exporter, "_run_saved", lambda *a: run(*a) ^ np.uint8(8))  # 8 levels off everywhere
    with pytest.raises(LoopfreeError, match=r"int8 graph.s images differ from PyTorch.s by [7-9]\.[0-9]+/255 on average \(tolerance 4\.0\)"):
        export_student(None, str(tmp_path / "int8"), max_batch=4, quantize="int8")
    assert not (tmp_path / "int8").exists() and not list(tmp_path.glob(".int8*"))


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, bundled):
    out, _ = bundled
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cases = [
        (["export", "--model", str(tmp_path), "--out", str(tmp_path / "a")], "model_index.json"),
        (["export", "--out", str(tmp_path / "mine")], "not empty"),
        (["export", "--out", str(tmp_path / "a"), "--max-batch", "64"], "64"),
        (["export", "--out", str(tmp_path / "a"), "--format", "pt2", "--quantize", "int8"], "with the onnx format"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(model_folder(None)), "--out", str(tmp_path / "a")], "not an exported student"),
        (["generate", "x", "--backend", "onnxruntime", "--out", str(tmp_path / "a")], "needs --model"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(out), "--steps", "2", "--out", str(tmp_path / "a")], "--steps does not apply"),
        (["generate", "x", "--backend", "onnxruntime", "--model", str(out), "--resolution", "32", "--out", str(tmp_path / "a")], "exported at 64x64"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)
    assert not (tmp_path / "a").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bench_backends_time_each_runtime_in_its_own_process_and_score_the_same_images(bundled, tmp_path, monkeypatch):
    """`loopfree bench --backend`: the export stubbed by the bundled fp32 graph, few quality images; torch and
    onnxruntime fp32 give the same scores (their images agree within 1/255), int8 its own."""
    from loopfree.cli import bench as bench_cli

    out, _ = bundled
    monkeypatch.setattr(exporter, "trace", lambda *a: None)
    monkeypatch.setattr(exporter, "save_graph", lambda program, path, fmt, names: shutil.copy(out / "sampler.onnx", path))
    monkeypatch.setattr(bench_cli, "QUALITY_PROMPTS", 4)
    r = CliRunner().invoke(main, ["bench", "--backend", "onnxruntime-int8", "--backend", "onnxruntime", "--backend", "torch",
                                  "--repeats", "1", "--threads", "1", "--quality", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    rows = {row["name"]: row for row in report["rows"]}
    assert [row["name"] for row in report["rows"]] == ["torch", "onnxruntime-int8", "onnxruntime"]  # torch first
    assert rows["torch"]["vs_torch"] == 1 and all(row["seconds"] > 0 and row["peak_rss_gib"] > 0.05 for row in rows.values())
    assert rows["onnxruntime"]["vs_torch"] == pytest.approx(rows["torch"]["seconds"] / rows["onnxruntime"]["seconds"])
    assert report["graph_mib"]["onnxruntime-int8"] < report["graph_mib"]["onnxruntime"]
    assert rows["onnxruntime"]["peak_rss_gib"] < rows["torch"]["peak_rss_gib"]  # its own process: no torch imported
    eager, fp32, int8 = (rows[b]["scores"] for b in ("torch", "onnxruntime", "onnxruntime-int8"))
    assert eager["n_images"] == 16 and eager["alignment"] == fp32["alignment"] and abs(eager["fd"] - fp32["fd"]) < 0.05
    assert int8["n_images"] == 16 and int8 != fp32
    bad = CliRunner().invoke(main, ["bench", "--backend", "torch", "--arch", "sd21", "--quality"])
    assert bad.exit_code == 2 and "--quality scores a trained toy student" in bad.output


def test_serve_with_onnxruntime_gives_generates_images_and_refuses_what_the_export_fixed(bundled, tmp_path):
    import base64

    import httpx

    from loopfree.serve.app import create_app
    from loopfree.serve.batcher import Batcher
    from loopfree.serve.engine import check_serve_models, load_engine
    from serving import running

    out, _ = bundled
    engine = load_engine(check_serve_models(str(out), None, None, "fp32", backend="onnxruntime"))
    assert CliRunner().invoke(main, ["generate", PROMPTS[0], "--images-per-prompt", "2", "--seed", "3", "--out", str(tmp_path / "torch")]).exit_code == 0
    with running(create_app(engine, Batcher(engine.render, max_batch=4, max_queue=8))) as url:
        post = lambda body: httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPTS[0], **body}, timeout=60)  # noqa: E731
        reply = post({"n": 2, "seed": 3})
        assert reply.status_code == 200, reply.text
        for i, image in enumerate(reply.json()["data"]):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))))
            assert levels(served, np.asarray(Image.open(tmp_path / "torch" / f"{i:03d}.png"))) <= 1
        for body, reason in [({"steps": 2}, "exported with K = 4 decoders, not 2"), ({"guidance": 2}, "unguided (guidance 1), not 2"),
                             ({"mode": "loop"}, "loop_free only"), ({"size": "32x32"}, "exported at 64x64")]:
            reply = post(body)
            assert reply.status_code == 400 and reason in reply.json()["error"]["message"], (body, reply.text)
    bad = CliRunner().invoke(main, ["serve", "--backend", "onnxruntime", "--model", str(out), "--teacher", str(out)])
    assert bad.exit_code == 2 and "--teacher does not apply to --backend onnxruntime" in bad.output
