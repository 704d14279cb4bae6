"""Resumable training checkpoints: written whole or not at all, verified before they are used.

A checkpoint is written into ``checkpoints/.tmp-checkpoint-N``; its last file is ``manifest.json`` (size and
BLAKE2b hash of every other file), then the folder is renamed to ``checkpoint-N``. Resuming checks the
manifest, so a truncated optimiser state or a missing per-process RNG state is refused with a line naming the
file instead of being skipped (accelerate only logs an unreadable RNG state). A checkpoint resumes with any process
count: its student, EMA and optimiser states are one copy (data parallel) or resharded on load (``--shard``); the
trainer gives a launch of another size new per-process RNG streams.

    save_checkpoint(acc, distiller, out, step, state)
    path = find_checkpoint(out, "latest")
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import write_json

CHECKPOINT = "checkpoint-"  # complete checkpoints: checkpoint-00000100
PARTIAL = ".tmp-"  # being written; renamed when complete, never resumed from
STATE = "trainer_state.json"  # step, data position, EMA step, process count, the run's configuration
MANIFEST = "manifest.json"  # written last: {relative path: {"size": bytes, "blake2b": hex}}
RNG_STATE = "random_states_{}.pkl"  # accelerate's per-process RNG states (loaded with weights_only=True)


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file, read in 4 MiB blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "blake2b": file_digest(p)} for p in files}
    write_json(directory / MANIFEST, entries)


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """The checkpoint's state if every file its manifest lists is there, whole, with an RNG state for each process
    that wrote it; else a LoopfreeError naming what is wrong."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise LoopfreeError(f"checkpoint {directory} is incomplete (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise LoopfreeError(f"checkpoint {directory}: {MANIFEST} is unreadable ({e.__class__.__name__})") from None
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            raise LoopfreeError(f"checkpoint {directory} is damaged: {name} is missing")
        if path.stat().st_size != entry["size"]:
            raise LoopfreeError(f"checkpoint {directory} is damaged: {name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        if file_digest(path) != entry["blake2b"]:
            raise LoopfreeError(f"checkpoint {directory} is damaged: {name} does not match its hash in the manifest")
    state = json.loads((directory / STATE).read_text()) if STATE in manifest else None
    if state is None:
        raise LoopfreeError(f"checkpoint {directory} is incomplete (no {STATE})")
    for rank in range(state["num_processes"]):
        if RNG_STATE.format(rank) not in manifest:
            raise LoopfreeError(f"checkpoint {directory} lacks {RNG_STATE.format(rank)}: the run could not continue exactly")
    return state


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints in ``out/checkpoints`` that finished writing, oldest first (by the step they record)."""
    root = out / "checkpoints"
    done = [p for p in root.glob(CHECKPOINT + "*") if (p / MANIFEST).is_file() and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(done, key=lambda p: json.loads((p / STATE).read_text())["step"])


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """``latest``: the newest complete checkpoint in ``out/checkpoints`` (an error if there is none); ``auto``: the
    same, or None; else ``resume`` is a checkpoint folder. Verified before it is returned."""
    if resume in ("latest", "auto"):
        done = complete_checkpoints(out)
        if not done:
            if resume == "auto":
                return None
            raise LoopfreeError(f"--resume latest: no complete checkpoint in {out / 'checkpoints'} to resume from")
        path = done[-1]
    else:
        path = Path(resume)
        if not (path / STATE).is_file():
            raise LoopfreeError(f"--resume {resume!r} is not a complete loopfree checkpoint (no {STATE})")
    verify_checkpoint(path)
    return path


def save_checkpoint(acc, distiller, out: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Write the accelerate state (optimisers, RNG), the networks and ``state`` as ``checkpoint-<step>``, then
    drop all but the newest ``keep`` checkpoints. Every process must call it."""
    root = out / "checkpoints"
    final, partial = root / f"{CHECKPOINT}{step:08d}", root / f"{PARTIAL}{CHECKPOINT}{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    distiller.save_weights(partial)  # every process: a sharded student's shards are written by their holders
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(partial / STATE, {**state, "step": step, "num_processes": acc.num_processes})
        write_manifest(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        done = complete_checkpoints(out)
        for old in done[: max(0, len(done) - (keep or len(done)))]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final
