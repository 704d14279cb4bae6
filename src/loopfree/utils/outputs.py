"""Output folders and atomic writes: the one contract every command follows.

- ``--out`` is a folder. A command that finishes in one go (``generate``, ``analyze``) builds its results in a
  hidden staging folder beside it and renames it into place at the end: a reader sees no folder, or the
  previous one, or the whole new one — never a mix, never half a file.
- A resumable command (``distill``, ``eval``, ``demo``) writes in place, file by file atomically, and records
  what it is (command + the settings that decide its results) in ``loopfree-run.json``. Running the same
  command with the same settings continues it; anything else is refused.
- A folder that already holds results is never replaced unless ``--overwrite`` is given; then the old folder
  is kept aside until the new results are complete, and restored if the new run fails.
- One process at a time: a lock beside the folder; a second writer is refused with a message.

    with OutputFolder("images", "generate", settings, overwrite=False) as out:
        save_image(out.path / "000.png", image)
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from loopfree.utils.errors import LoopfreeError

MARKER = "loopfree-run.json"


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], object]) -> None:
    """Write ``data`` (bytes, text, or a function that fills a path) to a temporary file beside ``path``, then
    rename it to ``path``: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_image(path: str | Path, image) -> None:
    """A PIL image as PNG, atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _writable_ancestor(path: Path) -> None:
    """An error unless the nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LoopfreeError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoopfreeError(f"--out {path}: cannot write in {parent} (permission denied)")


def read_marker(path: Path) -> dict | None:
    """What ``loopfree-run.json`` in ``path`` records, or None if there is none (an unreadable one is an error)."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoopfreeError(f"{marker} is unreadable ({e.__class__.__name__}); choose another --out or pass --overwrite") from None


def changed_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ (a key one side lacks differs)."""
    return [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]


def _differences(old: dict, new: dict) -> str:
    keys = changed_keys(old, new)
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:3]) + (" …" if len(keys) > 3 else "")


class OutputFolder:
    """The folder a command writes its results to (see the module docstring for the contract).

    The constructor only reads: it raises :class:`LoopfreeError` for a folder that can't be used, so commands
    build it before loading any model. ``with`` takes the lock and yields the object; write under ``.path``.
    """

    def __init__(self, path: str | Path, command: str, settings: dict | None = None, *, overwrite: bool = False,
                 resumable: bool = False):
        self.final = Path(os.path.abspath(path))
        self.command, self.settings, self.overwrite, self.resumable = command, settings or {}, overwrite, resumable
        self.resuming = False
        if self.final.exists() and not self.final.is_dir():
            raise LoopfreeError(f"--out {path} is a file, not a folder")
        _writable_ancestor(self.final)
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            marker = read_marker(self.final)
            if marker is None:
                raise LoopfreeError(f"--out {path} is not empty and holds no loopfree run; choose another folder or pass --overwrite")
            same = marker.get("command") == command and not changed_keys(marker.get("settings", {}), self.settings)
            if not (resumable and same):
                what = f"a `loopfree {marker.get('command')}` run"
                if resumable and marker.get("command") == command:
                    what += f" with other settings ({_differences(marker.get('settings', {}), self.settings)})"
                raise LoopfreeError(f"--out {path} already holds {what}; choose another folder or pass --overwrite")
            self.resuming = True
        if self.final.is_dir() and not os.access(self.final, os.W_OK | os.X_OK):
            raise LoopfreeError(f"--out {path}: cannot write in it (permission denied)")
        self.path = self.final
        self._lock_fd: int | None = None
        self._aside: Path | None = None
        self._probe_lock()

    def _sibling(self, tag: str) -> Path:
        return self.final.with_name(f".{self.final.name}.{tag}-{os.getpid()}")

    def _lock_path(self) -> Path:
        return self.final.with_name(f".{self.final.name}.lock")

    def _probe_lock(self) -> None:
        """Refuse now, before any work, if another process holds the folder's lock (taken for real on ``with``)."""
        try:
            fd = os.open(self._lock_path(), os.O_RDWR)
        except OSError:
            return  # no lock file: nobody is writing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise LoopfreeError(f"--out {self.final}: another loopfree process is writing to it; wait for it or choose another folder") from None
        finally:
            os.close(fd)

    def _lock(self) -> None:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        lock = self._lock_path()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LoopfreeError(f"--out {self.final}: another loopfree process is writing to it; wait for it or choose another folder") from None
        self._lock_fd, self._lock_path = fd, lock

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "OutputFolder":
        self._lock()
        try:
            replacing = self.overwrite and self.final.exists() and any(self.final.iterdir())
            if self.resumable:
                if replacing:  # keep the old results aside until the new run is complete
                    self._aside = self._sibling("old")
                    os.rename(self.final, self._aside)
                self.final.mkdir(parents=True, exist_ok=True)
                write_json(self.final / MARKER, {"command": self.command, "settings": self.settings})
            else:
                self.path = self._sibling("tmp")
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self._publish()
            else:
                self._discard()
        finally:
            self._unlock()

    def _publish(self) -> None:
        if not self.resumable:
            if self.final.exists():
                self._aside = self._sibling("old")
                os.rename(self.final, self._aside)
            os.rename(self.path, self.final)
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)

    def _discard(self) -> None:
        """A failed run: nothing half-written stays, and replaced results come back."""
        if not self.resumable:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self._aside is not None:
            shutil.rmtree(self.final, ignore_errors=True)
            os.rename(self._aside, self.final)
