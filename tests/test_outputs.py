"""The output-folder contract: staged and published whole, resumed only with the same settings, replaced only
on --overwrite (and given back if the new run fails), atomic files."""

import json

import pytest
from click.testing import CliRunner

from loopfree.cli import main
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import MARKER, OutputFolder, write_atomic, write_json


def test_a_one_go_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, "generate", {"a": 1}) as folder:
        (folder.path / "000.png").write_bytes(b"x")
        assert not out.exists()  # staged beside it until the run is complete
    assert sorted(p.name for p in out.iterdir()) == ["000.png"]
    with pytest.raises(RuntimeError):
        with OutputFolder(tmp_path / "failed", "generate") as folder:
            (folder.path / "000.png").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock left behind


def test_overwrite_replaces_and_a_failed_run_gives_the_old_results_back(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, "generate") as folder:
        for name in ("000.png", "001.png", "002.png"):
            (folder.path / name).write_bytes(b"old")
    with pytest.raises(LoopfreeError, match="not empty"):
        OutputFolder(out, "generate")
    with pytest.raises(RuntimeError):
        with OutputFolder(out, "generate", overwrite=True) as folder:
            (folder.path / "000.png").write_bytes(b"new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png"]
    with OutputFolder(out, "generate", overwrite=True) as folder:
        (folder.path / "000.png").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["000.png"] and (out / "000.png").read_bytes() == b"new"


def test_a_resumable_folder_continues_only_with_the_same_settings(tmp_path):
    out = tmp_path / "run"
    with OutputFolder(out, "eval", {"steps": 4}, resumable=True) as folder:
        (folder.path / "a.png").write_bytes(b"a")
    assert json.loads((out / MARKER).read_text()) == {"command": "eval", "settings": {"steps": 4}}
    assert OutputFolder(out, "eval", {"steps": 4}, resumable=True).resuming
    with pytest.raises(LoopfreeError, match=r"other settings \(steps: 4 → 8\)"):
        OutputFolder(out, "eval", {"steps": 8}, resumable=True)
    with pytest.raises(LoopfreeError, match="`loopfree eval` run"):
        OutputFolder(out, "demo", {"steps": 4}, resumable=True)
    with pytest.raises(RuntimeError):  # replaced, then the new run fails: the old one comes back
        with OutputFolder(out, "eval", {"steps": 8}, resumable=True, overwrite=True):
            raise RuntimeError("boom")
    assert (out / "a.png").is_file() and json.loads((out / MARKER).read_text())["settings"] == {"steps": 4}


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"v": 1})

    def fail(tmp):
        tmp.write_text('{"v": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_second_generate_into_a_folder_is_refused_and_overwrite_leaves_no_stale_images(tmp_path):
    """Before: the second run left the first run's extra images beside a generate.json that no longer listed them."""
    out = tmp_path / "images"
    prompt = "a red circle on a white background"
    assert CliRunner().invoke(main, ["generate", prompt, "--out", str(out), "--images-per-prompt", "3"]).exit_code == 0
    r = CliRunner().invoke(main, ["generate", prompt, "--out", str(out)])
    assert r.exit_code == 2 and "pass --overwrite" in r.output
    assert CliRunner().invoke(main, ["generate", prompt, "--out", str(out), "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "generate.json"]
    assert json.loads((out / "generate.json").read_text())["files"] == ["000.png"]
