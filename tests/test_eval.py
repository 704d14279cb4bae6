"""``loopfree eval`` end to end with stand-ins of the real networks: scores against independent computations
(torchmetrics' KID, brute-force PRDC, a hand-computed CLIP cosine), the reference cache, resuming, bad input."""

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from evalkit import (
    PROMPTS,
    inception_features,
    make_clip,
    make_inception,
    make_reference_images,
    make_sd,
    protocol_images,
)
from test_metrics import _brute_force_prdc

from loopfree.cli import main
from loopfree.evaluation.metrics import frechet_distance


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return dict(sd=make_sd(root / "sd"), inception=make_inception(root / "inception.pt"), clip=make_clip(root / "clip"),
                refs=make_reference_images(root / "refs"), prompts=str(root / "prompts.txt"), root=root)


def base_args(a, out, *extra):
    return ["eval", "--model", a["sd"], "--prompts", a["prompts"], "--out", out, "--images-per-prompt", 2, "--reference-images", a["refs"],
            "--inception", a["inception"], "--clip", a["clip"], "--metric-resolution", 16, "--latency-repeats", 1, *extra]


@pytest.fixture(scope="module")
def scored(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("evals") / "sd"
    r = run(*base_args(assets, out))
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "results.json").read_text())


def test_scores_equal_independent_computations(assets, scored):
    from torchmetrics.image.kid import KernelInceptionDistance
    from transformers import CLIPModel, CLIPProcessor

    out, results = scored
    manifest = [json.loads(line) for line in (out / "images" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == results["images"] == 12 and [m["prompt"] for m in manifest[::2]] == PROMPTS
    fake_images = protocol_images([out / "images" / m["file"] for m in manifest], 16)
    real_paths = sorted(p for p in Path(assets["refs"]).iterdir())
    net = torch.jit.load(assets["inception"])
    fake, real = inception_features(net, fake_images), inception_features(net, protocol_images(real_paths, 16))
    m = results["metrics"]
    assert m["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    for key, want in _brute_force_prdc(real, fake, 5).items():
        assert m[key] == pytest.approx(want, abs=1e-12), key

    class Features(torch.nn.Module):
        num_features = 2048

        def forward(self, x):
            return x

    kid = KernelInceptionDistance(feature=Features(), subsets=100, subset_size=12)
    kid.update(torch.from_numpy(real), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(0)  # eval draws its KID subsets from --seed
    assert (m["kid"], m["kid_std"]) == pytest.approx(tuple(float(v) for v in kid.compute()), rel=1e-5)

    model, processor = CLIPModel.from_pretrained(assets["clip"]), CLIPProcessor.from_pretrained(assets["clip"])
    with torch.no_grad():
        pixels = processor.image_processor(images=list(fake_images), return_tensors="pt").pixel_values
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor.tokenizer([x["prompt"] for x in manifest], padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cosines = torch.nn.functional.cosine_similarity(image, text).double().numpy()
    assert m["clip_score"] == pytest.approx(cosines.mean(), abs=1e-6)
    assert m["latency_ms"] > 0 and m["memory_gb"] is None and m["n_reference_images"] == 12
    assert set(results["weights"]) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                       "vae/diffusion_pytorch_model.safetensors"}
    assert results["versions"]["torch"] == torch.__version__.split("+")[0] or results["versions"]["torch"] == torch.__version__
    assert "FID↓" in (out / "results.md").read_text()


def test_reference_features_are_reused_by_the_next_model_and_recomputed_when_an_image_changes(assets, scored, monkeypatch):
    import loopfree.evaluation.run as run_module

    reads = []
    original = run_module.image_batches
    monkeypatch.setattr(run_module, "image_batches", lambda paths, size, desc: reads.append(desc) or original(paths, size, desc))
    first, _ = scored
    second = first.parent / "sd-guided"
    r = run(*base_args(assets, second, "--guidance", 2.0))
    assert r.exit_code == 0, r.output
    results = json.loads((second / "results.json").read_text())
    assert reads == ["features"] and results["reference"]["features"].startswith("reused from " + str(first / "reference"))
    assert results["metrics"]["n_reference_images"] == 12
    changed = Path(assets["refs"]) / "im05.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    r = run(*base_args(assets, second, "--guidance", 2.0))
    assert r.exit_code == 0, r.output
    assert reads == ["features", "reference features"]  # the generated images' features are cached too
    assert json.loads((second / "results.json").read_text())["reference"]["features"] == "computed"
    table = run("eval", "--report", first, second).output.splitlines()
    assert len(table) == 4 and table[2].startswith("| sd | sd | loop_free | 4 | 1 | 12 |") and "| sd-guided |" in table[3]


def test_same_settings_resume_other_settings_are_refused(assets, scored):
    out, results = scored
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert run(*base_args(assets, out, "--metrics", "fid,pr")).exit_code == 0  # scoring options are not the folder's identity
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == before
    r = run(*base_args(assets, out, "--seed", 1))
    assert r.exit_code == 2 and "other settings (seed: 0 → 1)" in r.output, r.output


def test_propagate_with_every_step_a_key_step_gives_the_loop_images(assets, tmp_path):
    """--mode propagate with every step a key step is the DDIM loop; the key steps are part of the folder's identity
    (a run saved before they were is resumed as default key steps)."""
    import numpy as np
    from PIL import Image

    from loopfree.utils.outputs import MARKER

    common = ["eval", "--model", assets["sd"], "--prompts", assets["prompts"], "--images-per-prompt", 2, "--steps", 3, "--guidance", 2.0,
              "--metrics", "clip", "--clip", assets["clip"]]
    loop, propagate = tmp_path / "loop", tmp_path / "propagate"
    assert (r := run(*common, "--mode", "loop", "--out", loop)).exit_code == 0, r.output
    assert (r := run(*common, "--mode", "propagate", "--key-steps", "0,1,2", "--out", propagate)).exit_code == 0, r.output
    pngs = sorted(p.name for p in (loop / "images").glob("*.png"))
    assert len(pngs) == 12 and pngs == sorted(p.name for p in (propagate / "images").glob("*.png"))
    for name in pngs:
        a, b = (np.asarray(Image.open(d / "images" / name), dtype=int) for d in (loop, propagate))
        assert np.abs(a - b).max() <= 1, name
    results = json.loads((propagate / "results.json").read_text())
    assert results["sampling"]["key_steps"] == results["settings"]["key_steps"] == [0, 1, 2] and results["sampling"]["steps"] == 3
    assert "| propagate | sd | propagate, 3 key steps | 3 | 2 | 12 |" in run("eval", "--report", propagate).output
    r = run(*common, "--mode", "propagate", "--key-steps", "0,2", "--out", propagate)
    assert r.exit_code == 2 and "other settings (key_steps: [0, 1, 2] → [0, 2])" in r.output, r.output
    marker = json.loads((loop / MARKER).read_text())
    del marker["settings"]["key_steps"]  # a run saved before key steps were a setting
    (loop / MARKER).write_text(json.dumps(marker))
    assert (r := run(*common, "--mode", "loop", "--out", loop)).exit_code == 0, r.output


TOY = ["eval", "--features", "toy", "--num-prompts", 3, "--images-per-prompt", 2, "--metrics", "alignment,fid,pr,dc", "--batch-size", 1]


def test_interrupted_generation_resumes_and_never_counts_a_partial_png(tmp_path, monkeypatch):
    from loopfree.evaluation import generation

    whole = tmp_path / "whole"
    assert run(*TOY, "--out", whole).exit_code == 0
    written = []

    def power_cut(path, image):
        if len(written) == 3:
            raise RuntimeError("power cut")
        written.append(Path(path).name)
        original(path, image)

    original = generation.save_image
    monkeypatch.setattr(generation, "save_image", power_cut)
    cut = tmp_path / "cut"
    r = run(*TOY, "--out", cut)
    assert r.exit_code == 1 and "power cut" in str(r.exception)
    (cut / "images" / ".000001_0001.png.tmp-999").write_bytes(b"\x89PNG half")  # a write that was killed
    assert sorted(p.name for p in (cut / "images").glob("*.png")) == sorted(written) and not (cut / "results.json").exists()
    kept = {name: (cut / "images" / name).stat().st_mtime_ns for name in written}
    monkeypatch.setattr(generation, "save_image", original)
    r = run(*TOY, "--out", cut)
    assert r.exit_code == 0, r.output
    assert {name: (cut / "images" / name).stat().st_mtime_ns for name in written} == kept
    assert not list((cut / "images").glob(".*tmp*"))
    pngs = sorted(p.name for p in (whole / "images").glob("*.png"))
    assert len(pngs) == 6 and all((whole / "images" / n).read_bytes() == (cut / "images" / n).read_bytes() for n in pngs)
    assert json.loads((cut / "results.json").read_text())["metrics"] == json.loads((whole / "results.json").read_text())["metrics"]


def test_subset_gives_the_same_images_as_the_full_set(tmp_path):
    """--num-prompts on a prompt file is a seeded subset; each image depends on its prompt's index in the file."""
    prompts = tmp_path / "p.txt"
    from loopfree.toy.world import heldout_prompts

    prompts.write_text("\n".join(heldout_prompts(6, seed=3)) + "\n")
    args = ["eval", "--features", "toy", "--prompts", prompts, "--metrics", "alignment", "--batch-size", 1]
    assert run(*args, "--out", tmp_path / "all").exit_code == 0
    assert run(*args, "--out", tmp_path / "some", "--num-prompts", 3).exit_code == 0
    some = sorted(p.name for p in (tmp_path / "some" / "images").glob("*.png"))
    assert len(some) == 3 and some != [f"{i:06d}_0000.png" for i in range(3)]
    assert all((tmp_path / "some" / "images" / n).read_bytes() == (tmp_path / "all" / "images" / n).read_bytes() for n in some)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--inception": "{root}/missing.pt"}, "does not exist: download inception-2015-12-05.pt"),
        ({"--inception": None}, "need --inception FILE"),
        ({"--inception": "{root}/prompts.txt"}, "is not a TorchScript file"),
        ({"--inception": "{root}/wrong.pt"}, "is not the Inception feature network"),
        ({"--clip": "{root}/nope"}, "--clip {root}/nope does not exist"),
        ({"--clip": None}, "--metrics clip needs --clip DIR"),
        ({"--clip": "{sd}/text_encoder"}, "not CLIP"),
        ({"--prompts": "{root}/empty.txt"}, "no prompts in"),
        ({"--reference-images": "{root}/noimages"}, "holds no images"),
        ({"--reference-images": None}, "compare against a reference"),
        ({"--reference-model": "{sd}"}, "not both"),
        ({"--num-prompts": "0"}, "--num-prompts must be at least 1"),
        ({"--num-prompts": "7"}, "more than the 6 prompts"),
        ({"--metrics": "fid,alignment"}, "needs --features toy"),
        ({"--metrics": "fid,nope"}, "--metrics must name"),
        ({"--prompts": None}, "--prompts is required"),
        ({"--model": "{root}/nomodel"}, "--model: model folder"),
        ({"--resolution": "13"}, "multiple of"),
        ({"--timesteps": "751,1", "--mode": "loop"}, "decoder timesteps of the loop_free mode"),
        ({"--mode": "propagate", "--steps": "3", "--key-steps": "0,3"}, "key step 3 is not in the 3-step schedule"),
        ({"--mode": "propagate", "--key-steps": "1,2"}, "must include the first step, 0"),
        ({"--key-steps": "0,1"}, "key steps belong to the propagate mode, not to 'loop_free'"),
        ({"--features": "toy", "--reference-images": None, "--metrics": "alignment"}, "does not name the"),
    ],
)
def test_bad_input_exits_2_in_one_line_and_writes_nothing(assets, tmp_path, change, message):
    root = assets["root"]
    if not (root / "wrong.pt").exists():
        torch.jit.script(torch.nn.Linear(3, 3)).save(str(root / "wrong.pt"))
        (root / "empty.txt").write_text("\n \n")
        (root / "noimages").mkdir()
        (root / "noimages" / "notes.txt").write_text("no images here")
    args = base_args(assets, tmp_path / "out")
    flags = dict(zip(args[1::2][:9], args[2::2][:9]))
    for flag, value in change.items():
        flags.pop(flag, None) if value is None else flags.__setitem__(flag, value.format(root=root, sd=assets["sd"]))
    r = run("eval", *[x for kv in flags.items() for x in kv], *args[19:])
    assert r.exit_code == 2, r.output
    assert message.format(root=root) in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


def test_report_needs_finished_runs(tmp_path):
    r = run("eval", "--report", tmp_path)
    assert r.exit_code == 2 and "results.json is missing" in r.output
    assert "needs one or more" in run("eval", "--report").output
    assert "only taken with --report" in run("eval", tmp_path, "--out", tmp_path / "x").output


def test_two_processes_give_the_same_images_and_scores_as_one(tmp_path):
    """`accelerate launch --num_processes 2` on a CPU (gloo): each process generates its share, the main one scores.
    Both runs use one thread per process: another thread count may round a float differently (a pixel by one level)."""
    import subprocess
    import sys

    args = [a for a in map(str, TOY) if a != "--batch-size" and a != "1"] + ["--num-prompts", "4", "--batch-size", "2"]
    args = args[:args.index("--num-prompts")] + args[args.index("--num-prompts") + 2:]  # 3 → 4 prompts: 4 batches of 2
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "loopfree"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 1  # one process scores and reports
    p = subprocess.run([sys.executable, "-m", "loopfree", *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    pngs = sorted(p.name for p in (tmp_path / "one" / "images").glob("*.png"))
    assert len(pngs) == 8 and pngs == sorted(p.name for p in (tmp_path / "two" / "images").glob("*.png"))
    assert all((tmp_path / "one" / "images" / n).read_bytes() == (tmp_path / "two" / "images" / n).read_bytes() for n in pngs)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["metrics"] == two["metrics"]


def test_a_reference_model_against_itself_scores_fd_0_and_full_coverage(tmp_path):
    """Table 2's protocol: the reference is another model's samples of the same prompts and seeds."""
    from loopfree.toy.assets import bundled

    teacher = bundled("teacher")
    args = [*TOY[:-2], "--batch-size", 6, "--model", teacher, "--mode", "loop", "--steps", 3, "--guidance", 4.5, "--reference-model",
            teacher, "--reference-steps", 3, "--reference-guidance", 4.5, "--out", tmp_path / "self"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "self" / "results.json").read_text())
    m = results["metrics"]  # fd: 0 up to the matrix square root's rounding (1e-5 on one thread)
    assert abs(m["fd"]) < 1e-4 and m["precision"] == m["recall"] == m["coverage"] == 1.0 and m["n_reference_images"] == 6
    assert "3-step DDIM loop, guidance 4.5" in results["reference"]["what"]
    (folder,) = (tmp_path / "self" / "reference-images").iterdir()
    pngs = sorted(p.name for p in (tmp_path / "self" / "images").glob("*.png"))
    assert all((folder / n).read_bytes() == (tmp_path / "self" / "images" / n).read_bytes() for n in pngs)
