"""Every command against a catalogue of bad input: exit 2, exactly one line on stderr, no traceback, nothing written.

Broken model folders are built from the bundled toy teacher (unchanged files are hard links, so a case costs
no copy); numbers out of range and bad output folders complete the table. The in-process cases use click's
runner (stderr is captured apart from stdout); a few run the real console script, where import-time warnings
would show.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loopfree.cli import main
from loopfree.toy.assets import bundled

UNET = "unet/diffusion_pytorch_model.safetensors"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # never write through a hard link into the bundled file
    path.write_bytes(data[: len(data) // 3])


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _as_pickle(path: Path) -> None:
    path.unlink()
    path.with_suffix(".bin").write_bytes(b"\x80\x02}q\x00.")


def _missing_shard(folder: Path) -> None:
    (folder / UNET).unlink()
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


#: name -> how to break a copy of the teacher folder, and a fragment the one-line error must contain
BROKEN = {
    "unet weights truncated": (lambda f: _truncate(f / UNET), "is truncated"),
    "unet weights random bytes": (lambda f: _replace(f / UNET, os.urandom(4096)), "not a safetensors file"),
    "unet weights empty": (lambda f: _replace(f / UNET, b""), "is empty"),
    "unet weights missing": (lambda f: (f / UNET).unlink(), "diffusion_pytorch_model.safetensors is missing"),
    "unet weights only a pickle": (lambda f: _as_pickle(f / UNET), "only pickled weights"),
    "unet weights a folder": (lambda f: ((f / UNET).unlink(), (f / UNET).mkdir()), "is a folder"),
    "unet shard missing": (_missing_shard, "00001-of-00002.safetensors is missing"),
    "vae weights truncated": (lambda f: _truncate(f / "vae/diffusion_pytorch_model.safetensors"), "vae"),
    "text encoder garbage": (lambda f: _replace(f / "text_encoder/model.safetensors", b"\x00" * 64), "text_encoder/model.safetensors"),
    "model_index.json broken": (lambda f: _replace(f / "model_index.json", b'{"unet": ['), "model_index.json is not valid JSON"),
    "model_index.json a list": (lambda f: _replace(f / "model_index.json", b"[1, 2]"), "is not a JSON object"),
    "unet config broken": (lambda f: _replace(f / "unet/config.json", b"{sample_size: 16}"), "unet/config.json is not valid JSON"),
    "unet config lacks sample_size": (lambda f: _replace(f / "unet/config.json", b'{"in_channels": 4}'), "lacks a required entry"),
    "scheduler config broken": (lambda f: _replace(f / "scheduler/scheduler_config.json", b"nope"), "scheduler_config.json"),
    "tokenizer json broken": (lambda f: _replace(f / "tokenizer/vocab.json", b"{"), "vocab.json is not valid JSON"),
    "vae component missing": (lambda f: shutil.rmtree(f / "vae"), "no vae component"),
    "loopfree.json broken": (lambda f: (f / "loopfree.json").write_text("{"), "loopfree.json is not valid JSON"),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for i, (name, (damage, _)) in enumerate(BROKEN.items()):
        folder = root / f"case{i}"
        shutil.copytree(bundled("teacher"), folder, copy_function=os.link)
        damage(folder)
        folders[name] = folder
    (root / "a file").write_text("x")
    folders["a file, not a folder"] = root / "a file"
    folders["no such folder"] = root / "nope"
    return folders


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def check(args: list[str], where: Path, fragment: str) -> None:
    """Run the command in-process; exit 2, one stderr line holding ``fragment``, no traceback, ``where`` unchanged."""
    before = tree(where)
    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (args, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, r.stderr)
    assert fragment in lines[0], (args, lines[0])
    assert "Traceback" not in r.output
    assert tree(where) == before, args


MODEL_FLAG = {  # the model option of each command that loads one, and the rest of a valid call
    "generate": (["generate", "a red circle on a white background"], "--model"),
    "distill": (["distill", "--prompts", "{prompts}", "--max-steps", "1"], "--teacher"),
    "demo": (["demo", "--max-steps", "1"], "--teacher"),
}
EXTRA_BROKEN = {"no such folder": "does not exist", "a file, not a folder": "is a file, not a folder"}


@pytest.mark.parametrize("command", list(MODEL_FLAG))
@pytest.mark.parametrize("case", [*BROKEN, *EXTRA_BROKEN])
def test_broken_model_folders(broken, tmp_path, command, case):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background, left\n")
    head, flag = MODEL_FLAG[command]
    args = [a.replace("{prompts}", str(prompts)) for a in head] + [flag, broken[case], "--out", tmp_path / "out"]
    fragment = BROKEN[case][1] if case in BROKEN else EXTRA_BROKEN[case]
    check(args, tmp_path, fragment)


NUMBERS = [
    (["generate", "x", "--steps", "1001"], "steps must be in 1..1000"),
    (["generate", "x", "--steps", "0"], "'--steps'"),
    (["generate", "x", "--resolution", "99996"], "over this model's limit"),
    (["generate", "x", "--resolution", "62"], "multiple of 4"),
    (["generate", "x", "--resolution", "64x"], "is not a size"),
    (["generate", "x", "--seed", "-1"], "'--seed'"),
    (["generate", "x", "--seed", str(2**64)], "'--seed'"),
    (["generate", "x", "--guidance", "nan"], "finite"),
    (["generate", "x", "--guidance", "inf"], "finite"),
    (["generate", "x", "--guidance", "-1"], "at least 0"),
    (["generate", "x", "--images-per-prompt", "0"], "'--images-per-prompt'"),
    (["generate", "x", "--timesteps", "1000,1"], "[0, 999]"),
    (["generate", "x", "--timesteps", "1,500"], "strictly decreasing"),
    (["generate", "x", "--timesteps", "900,x"], "not a comma-separated list"),
    (["generate", "x", "--mode", "loop", "--timesteps", "900,1"], "loop_free mode"),
    (["generate", "x", "--dtype", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["generate", "x", "--device", "tpu"], "unknown device"),
    (["distill", "--max-steps", "0"], "max_steps"),
    (["distill", "--batch-size", "0"], "batch_size"),
    (["distill", "--lr-student", "-1"], "lr_student"),
    (["distill", "--guidance", "nan"], "guidance"),
    (["distill", "--kl-weight", "-0.5"], "kl_weight"),
    (["distill", "--t-max", "1000"], "t_max"),
    (["distill", "--resolution", "62"], "multiple of 4"),
    (["distill", "--timesteps", "700,900"], "timesteps"),
    (["demo", "--num-prompts", "0"], "--num-prompts must be in 1..64"),
    (["demo", "--images-per-prompt", "1"], "at least 2"),
    (["demo", "--max-steps", "0"], "'--max-steps'"),
    (["demo", "--train-seeds", "0"], "'--train-seeds'"),
    (["bench", "--arch", "tiny", "--resolution", "13"], "multiple of 8"),
    (["bench", "--arch", "tiny", "--steps", "0"], "'--steps'"),
    (["bench", "--arch", "tiny", "--repeats", "0"], "'--repeats'"),
]


@pytest.mark.parametrize("args, fragment", NUMBERS, ids=[" ".join(a[:1] + a[2:] if a[0] == "generate" else a) for a, _ in NUMBERS])
def test_numbers_out_of_range(tmp_path, args, fragment):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background, left\n")
    extra = {"distill": ["--teacher", str(bundled("teacher")), "--prompts", str(prompts)]}.get(args[0], [])
    check([*args, *extra, *(["--out", tmp_path / "out"] if args[0] != "bench" else [])], tmp_path, fragment)


def _file(tmp: Path) -> Path:
    (tmp / "taken").write_text("mine")
    return tmp / "taken"


def _foreign(tmp: Path) -> Path:
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.png").write_bytes(b"not ours")
    return tmp / "photos"


def _other_command(tmp: Path) -> Path:
    (tmp / "run").mkdir()
    (tmp / "run" / "loopfree-run.json").write_text(json.dumps({"command": "eval", "settings": {}}))
    return tmp / "run"


def _under_a_file(tmp: Path) -> Path:
    return _file(tmp) / "sub"


OUTS = {
    "--out is a file": (_file, "is a file, not a folder"),
    "--out under a file": (_under_a_file, "is a file, not a folder"),
    "--out holds other files": (_foreign, "not empty and holds no loopfree run"),
    "--out holds another command's run": (_other_command, "`loopfree eval` run"),
}


@pytest.mark.parametrize("command", ["generate", "distill", "demo"])
@pytest.mark.parametrize("case", list(OUTS))
def test_bad_output_folders(tmp_path, command, case):
    make, fragment = OUTS[case]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background, left\n")
    args = {"generate": ["generate", "x"], "distill": ["distill", "--teacher", bundled("teacher"), "--prompts", prompts],
            "demo": ["demo"]}[command]
    check([*args, "--out", make(tmp_path)], tmp_path, fragment)


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_a_second_writer_is_refused(tmp_path, command):
    """Two runs into one folder: the second is refused while the first holds the lock."""
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        args = {"generate": ["generate", "a red circle on a white background"], "demo": ["demo", "--max-steps", "1"]}[command]
        before = tree(tmp_path)
        r = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert r.exit_code == 2 and "another loopfree process is writing to it" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and tree(tmp_path) == before
    finally:
        os.close(fd)


def test_unreadable_weights_are_named(broken, tmp_path, monkeypatch):
    """A weights file without read permission (simulated: root reads every file)."""
    target = str(bundled("teacher") / UNET)
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    check(["generate", "x", "--model", bundled("teacher"), "--out", tmp_path / "out"], tmp_path, "permission denied")


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--model", "{broken}"], "is truncated"),
    (["distill", "--teacher", "{broken}", "--prompts", "{prompts}"], "is truncated"),
    (["generate", "x", "--guidance", "nan"], "finite"),
])
def test_console_script_prints_one_line(broken, tmp_path, args, fragment):
    """The real command, imports and all: no warning or progress bar beside the error."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    subs = {"{broken}": str(broken["unet weights truncated"]), "{prompts}": str(prompts)}
    argv = [sys.executable, "-m", "loopfree", *[subs.get(a, a) for a in args], "--out", str(tmp_path / "out")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and fragment in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
