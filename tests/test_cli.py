"""``loopfree generate`` / ``bench``: outputs on good input; exit 2, one line, nothing written on bad input."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from loopfree.cli import main
from tiny import make_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pipe = make_pipeline(root, "sd")
    pipe.decoder_timesteps = [751, 501, 251, 1]
    pipe.save_pretrained(root / "model")
    return root / "model"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_generate_writes_pngs_and_settings(model_dir, tmp_path):
    out = tmp_path / "images"
    r = run("generate", "a red cat", "--model", model_dir, "--out", out, "--images-per-prompt", 2, "--seed", 3, "--guidance", 2)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "generate.json").read_text())
    assert settings["files"] == ["000.png", "001.png"] and settings["seed"] == 3 and settings["guidance"] == 2.0
    assert settings["timesteps"] == [751, 501, 251, 1] and settings["mode"] == "loop_free"
    assert Image.open(out / "000.png").size == (16, 16)
    # same seed, same pictures, whatever the number of images asked for
    again = tmp_path / "again"
    run("generate", "a red cat", "--model", model_dir, "--out", again, "--images-per-prompt", 3, "--seed", 3, "--guidance", 2)
    assert json.loads((again / "generate.json").read_text())["seeds"][:2] == settings["seeds"]  # the same x_T, exactly
    assert (again / "001.png").read_bytes() == (out / "001.png").read_bytes()  # here; a batch of 3 may round apart elsewhere


@pytest.mark.parametrize("command, flag", [("generate", "--num-images"), ("generate", "--height"),
                                           ("distill", "--decoder-steps"), ("bench", "--decoders")])
def test_pre_release_spellings_are_unknown_options(command, flag):
    """0.1.0 was never released: no alias rewrites a flag (a prompt "--num-images" stays a prompt)."""
    r = CliRunner().invoke(main, [command, flag, "2"])
    assert r.exit_code == 2 and f"No such option '{flag}'" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["a red cat", "--model", "{missing}"], "does not exist"),
        (["a red cat", "--model", "{notpipe}"], "not a diffusers pipeline"),
        (["a red cat", "--model", "{halfpipe}"], "no unet component"),
        (["   ", "--model", "{model}"], "prompt is empty"),
        (["a red cat", "--model", "{model}", "--steps", "0"], "'--steps'"),
        (["a red cat", "--model", "{model}", "--resolution", "16x15"], "height must be a positive multiple of 2"),
        (["a red cat", "--model", "{model}", "--resolution", "0x16"], "width must be a positive multiple of 2"),
        (["a red cat", "--model", "{model}", "--device", "gpu7"], "unknown device"),
        (["a red cat", "--model", "{model}", "--device", "cuda:3"], "device 'cuda:3'"),
    ],
)
def test_generate_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, args, message):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "halfpipe").mkdir()
    (tmp_path / "halfpipe" / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')
    subs = {"{missing}": tmp_path / "nope", "{notpipe}": tmp_path / "notpipe", "{halfpipe}": tmp_path / "halfpipe", "{model}": model_dir}
    out = tmp_path / "out"
    r = run("generate", *[subs.get(a, a) for a in args], "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_console_script_error_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "loopfree", "generate", "x", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and "does not exist" in p.stderr


def test_bench_tiny_json():
    r = run("bench", "--arch", "tiny", "--repeats", "1", "--json", "--unet-only")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("{"):])["rows"]
    names = [row["name"] for row in rows]
    assert names[0] == "full UNet, 1 step" and rows[0]["ratio"] == 1.0
    assert {"one pass, K=4", "one pass, K=4, plain decoders", "encoder alone", "decoder alone (1 step)",
            "4 decoders batched", "4 decoders batched, plain"} <= set(names)
    assert all(row["median_s"] > 0 and row["gflops"] > 0 and row["section"] == "UNet" for row in rows)
    assert run("bench", "--arch", "tiny", "--resolution", "12").exit_code == 2


def test_bench_table_has_both_sections():
    r = run("bench", "--arch", "tiny", "--repeats", "1", "--steps", "2")
    assert r.exit_code == 0, r.output
    assert "one pass, K=2, plain decoders" in r.output and "end-to-end, one pass, K=2" in r.output and "GFLOP" in r.output


def test_bench_refuses_compile_with_train():
    r = run("bench", "--train", "--compile", "--arch", "tiny")
    assert r.exit_code == 2 and "--compile" in r.output and "Traceback" not in r.output


def test_bench_train_sections_add_up():
    r = run("bench", "--train", "--arch", "tiny", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row["median_s"] for row in json.loads(r.output[r.output.index("{"):])["rows"]}
    parts = ["student forward+backward", "teacher+fake guided passes", "fake-score update"]
    assert set(parts) < set(rows) and all(rows[p] > 0 for p in parts)
    assert sum(rows[p] for p in parts) <= rows["one iteration"] * 1.001


@pytest.mark.parametrize("args, fragment", [
    (["--timesteps", ",".join(str(t) for t in range(1, 501))], "[1, 2, 3, 4, …, 500] (500 values)"),
    (["--steps", "1000"], "use at most 999"),  # leading spacing + steps_offset 1 would plan timestep 1000
    (["--steps", "1000", "--mode", "loop"], "use at most 999"),
])
def test_long_or_derived_plans_give_one_short_line(tmp_path, args, fragment):
    r = CliRunner().invoke(main, ["generate", "a red circle", "--out", str(tmp_path / "o"), *args])
    line = r.stderr.strip()
    assert r.exit_code == 2 and fragment in line and len(line) <= 200 and "\n" not in line, line
    assert not (tmp_path / "o").exists()
