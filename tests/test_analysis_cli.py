"""``loopfree analyze``: every subcommand writes its PNG and JSON (tiny models; the toy world's quality on the
bundled teacher); bad input exits 2 with one line and writes nothing."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from loopfree.cli import main
from tiny import make_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SD student folder that recorded decoder timesteps [751, 501, 251, 1]."""
    pipe = make_pipeline(tmp_path_factory.mktemp("tiny"), "sd")
    pipe.decoder_timesteps = [751, 501, 251, 1]
    pipe.save_pretrained(folder := tmp_path_factory.mktemp("student"))
    return folder


def run(*args):
    return CliRunner().invoke(main, ["analyze", *[str(a) for a in args]])


SMALL = ["--num-prompts", 2, "--images-per-prompt", 2]


def _written(out, name):
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.png"]
    assert Image.open(out / f"{name}.png").size[0] > 100
    return json.loads((out / f"{name}.json").read_text())


def test_features_writes_similarity_per_n(model_dir, tmp_path):
    r = run("features", "--model", model_dir, "--steps", "1,3", *SMALL, "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    rows = _written(tmp_path / "f", "features")["rows"]
    assert [row["steps"] for row in rows] == [1, 3] and rows[0]["encoder_similarity"] is None
    assert -1 <= rows[1]["encoder_similarity"] <= 1 and "quality" not in rows[1]  # not a toy-world model


def test_noise_compares_students_with_the_teacher(model_dir, tmp_path):
    r = run("noise", "--model", model_dir, "--teacher", model_dir, *SMALL, "--out", tmp_path / "n")
    assert r.exit_code == 0, r.output
    rows = _written(tmp_path / "n", "noise")["rows"]
    assert [row["role"] for row in rows] == ["student", "teacher"] and rows[0]["items"] == 4 * 4
    assert rows[0]["timesteps"] == rows[1]["timesteps"] == [751, 501, 251, 1]


def test_interpolate_writes_a_labelled_grid(model_dir, tmp_path):
    r = run("interpolate", "--model", model_dir, "--from", "a red cat", "--to", "a blue dog", "--columns", 3, "--rows", 2,
            "--method", "lerp", "--out", tmp_path / "i")
    assert r.exit_code == 0, r.output
    written = _written(tmp_path / "i", "interpolate")
    assert written["weights"] == [0.0, 0.5, 1.0] and written["method"] == "lerp"


def test_steps_rows(model_dir, tmp_path):
    r = run("steps", "--model", model_dir, "--steps", "2,10", *SMALL, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    rows = _written(tmp_path / "s", "steps")["rows"]
    assert [(row["mode"], row["steps"]) for row in rows] == [("loop_free", 4), ("loop", 2), ("propagate", 2), ("loop", 10),
                                                             ("propagate", 10), ("propagate", 10)]
    # N = 2: Faster Diffusion's key steps would be every step, so no row of its own
    assert [row["key_steps"] for row in rows[2:]] == [[0], None, [0, 1, 2, 3, 5, 7], [0]]
    assert all(row["ms_per_image"] > 0 for row in rows)


def test_toy_world_quality_on_the_bundled_teacher(tmp_path):
    r = run("features", "--steps", "2", "--num-prompts", 3, "--images-per-prompt", 2, "--out", tmp_path / "toy")
    assert r.exit_code == 0, r.output
    (row,) = _written(tmp_path / "toy", "features")["rows"]
    assert set(row["quality"]) == {"alignment", "fd"} and 0 <= row["quality"]["alignment"] <= 1


def test_steps_clip_score_is_eval_clip_score_of_the_same_images(model_dir, tmp_path):
    """--clip gives a real (non-toy) model a quality figure: each row's clip_score is what `loopfree eval --metrics clip`
    reports for the same prompts, seeds and sampling (its images, its ClipScorer)."""
    from evalkit import make_clip

    clip = make_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe blue dog\n")
    r = run("steps", "--model", model_dir, "--prompts", prompts, *SMALL, "--steps", "2,4", "--batch-size", 4, "--clip", clip,
            "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    written = _written(tmp_path / "s", "steps")
    rows = {row["name"]: row for row in written["rows"]}
    assert all(-1 <= row["clip_score"] <= 1 and "alignment" not in row for row in rows.values())
    assert written["clip"]["path"] == str(clip) and list(written["clip"]["sha256"]) == ["model.safetensors"]
    common = ["eval", "--model", model_dir, "--prompts", prompts, "--images-per-prompt", 2, "--batch-size", 4, "--metrics", "clip",
              "--clip", clip]
    for name, sampling in [("one pass, K=4", []), ("DDIM 2, full UNet", ["--mode", "loop", "--steps", 2]),
                           ("DDIM 4, encoder at 3 key steps", ["--mode", "propagate", "--steps", 4])]:
        out = tmp_path / name.replace(" ", "").replace(",", "-").replace("=", "")
        e = CliRunner().invoke(main, [str(a) for a in [*common, *sampling, "--out", out]])
        assert e.exit_code == 0, e.output
        assert rows[name]["clip_score"] == json.loads((out / "results.json").read_text())["metrics"]["clip_score"], name


@pytest.mark.parametrize("args, message", [
    (["features", "--model", "{missing}"], "does not exist"),
    (["noise", "--model", "{model}", "--model", "{missing}"], "does not exist"),
    (["noise", "--teacher", "{notpipe}"], "not a diffusers pipeline"),
    (["steps", "--model", "{notpipe}"], "not a diffusers pipeline"),
    (["features", "--steps", ""], "the list is empty"),
    (["steps", "--steps", "2,0"], "steps must be in 1..1000"),
    (["steps", "--model", "{model}", "--clip", "{missing}"], "does not exist"),
    (["features", "--model", "{model}", "--clip", "{notpipe}"], "config.json is missing"),
    (["features", "--prompts", "{missing}"], "prompt file not found"),
    (["interpolate", "--from", ""], "--from and --to must both be non-empty"),
    (["interpolate", "--to", "   "], "--from and --to must both be non-empty"),
    (["interpolate", "--method", "cubic"], "'--method'"),
    (["interpolate", "--model", "{model}", "--mode", "propagate", "--steps", "1", "--guidance", "nan"], "finite"),
])
def test_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, args, message):
    (tmp_path / "notpipe").mkdir()
    subs = {"{missing}": tmp_path / "nope", "{notpipe}": tmp_path / "notpipe", "{model}": model_dir}
    out = tmp_path / "out"
    r = run(*[subs.get(a, a) for a in args], "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()
