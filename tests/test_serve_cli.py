"""``loopfree serve`` as a command: bad folders and addresses are one line and exit 2 before anything starts;
SIGTERM answers the requests in flight, then the process exits 0; ``python -m loopfree`` is ``loopfree``;
``import loopfree`` and the help stay free of the server's heavy imports."""

import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from loopfree.cli import main
from loopfree.toy.assets import bundled
from tiny import make_pipeline

PROMPT = "a large blue square in the centre of a black image"


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A pipeline whose VAE downsamples by 2 (the toy student's by 4)."""
    root = tmp_path_factory.mktemp("serve-cli")
    make_pipeline(root, "sd").save_pretrained(root / "model")
    return root / "model"


@pytest.fixture
def busy_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "does not exist"),
    (["--teacher", "{tmp}"], "is not a diffusers pipeline folder (no model_index.json)"),
    (["--teacher", "{other_vae}"], "the teacher's VAE downsamples by 2, the student's by 4"),
    (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
    (["--host", "no-such-host.invalid"], "unknown host"),
    (["--max-batch", "0"], "'--max-batch'"),
])
def test_bad_input_is_one_line_and_exit_2_before_serving(tmp_path, other_vae, busy_port, args, message):
    fill = dict(missing=tmp_path / "missing", tmp=tmp_path, other_vae=other_vae, busy=busy_port)
    start = time.monotonic()
    result = CliRunner().invoke(main, ["serve", *[a.format(**fill) for a in args]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message.format(**fill) in lines[0]
    assert time.monotonic() - start < 30  # failed before loading models or serving


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_a_missing_device_is_one_line():
    result = CliRunner().invoke(main, ["serve", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "loopfree", "serve", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    assert match, f"no URL in {line!r} (exit code {process.poll()})"
    return process, match.group(1)


def test_sigterm_answers_the_requests_in_flight_then_exits_0():
    process, url = start_server("--model", str(bundled("student")), "--max-batch", "1", "--threads", "1")  # no teacher
    bodies = [{"prompt": PROMPT, "seed": i, "n": 2, "mode": "loop", "steps": 20} for i in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = [pool.submit(httpx.post, f"{url}/v1/images/generations", json=b, timeout=120) for b in bodies]
            deadline = time.monotonic() + 60
            while (health := httpx.get(f"{url}/health").json())["submitted"] < len(bodies):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            assert health["images"] < 2 * len(bodies)  # work was in flight when the signal came
            assert [r.result(120).status_code for r in replies] == [200] * len(bodies)
            assert all(len(r.result().json()["data"]) == 2 for r in replies)
        assert process.wait(60) == 0
        assert "every accepted request was answered" in process.stdout.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        process.kill()


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_python_m_loopfree_is_the_loopfree_command(tmp_path):
    script = Path(sys.executable).parent / "loopfree"
    if not script.exists():
        pytest.skip(f"no loopfree console script beside {sys.executable}")
    answers = {}
    for args in (["--help"], ["serve", "--help"], ["generate", "--steps", "0", "x"]):
        a, b = run(sys.executable, "-m", "loopfree", *args), run(str(script), *args)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
        answers[args[0]] = a
    assert "serve" in answers["--help"].stdout and answers["serve"].stdout.startswith("Usage: loopfree serve")
    assert answers["generate"].returncode == 2 and answers["generate"].stderr.startswith("Error:")
    for name, command in (("a", [sys.executable, "-m", "loopfree"]), ("b", [str(script)])):
        done = run(*command, "generate", PROMPT, "--out", name, "--seed", "4", cwd=tmp_path)
        assert done.returncode == 0 and done.stdout == f"wrote 1 image(s) to {tmp_path / name}\n"
    assert (tmp_path / "a" / "000.png").read_bytes() == (tmp_path / "b" / "000.png").read_bytes()


def test_import_and_help_load_neither_the_server_nor_torch():
    code = ("import sys, loopfree\nfrom loopfree.cli import main\n"
            "for args in (['--help'], ['serve', '--help']):\n"
            "    try: main(args)\n    except SystemExit: pass\n"
            "print('HEAVY', sorted(m for m in ('gradio', 'fastapi', 'uvicorn', 'torch') if m in sys.modules))")
    assert run(sys.executable, "-c", code).stdout.splitlines()[-1] == "HEAVY []"
