"""Writing a directory all at once: readers see the old one or the new one, never half of either.

A write fills ``.NAME.tmp-PID-*`` beside the target. A target that does not exist yet is then one rename away.
Replacing one takes three renames, and a process killed between them leaves every complete copy on disk under a
name that says what it is: the filled copy is first renamed ``.NAME.new-PID`` (complete, newest), the old target
``.NAME.old-PID``, and then the new copy takes the target's name. :func:`recover_directory` puts the newest
complete copy back at the target's name and removes what killed writes left behind; :func:`atomic_directory`
runs it first, and readers of run directories (``hyla train --resume``, a run's model) call it on start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _leftovers(target: Path) -> dict[str, list[Path]]:
    """The siblings a dead writer left: ``{"tmp": [...], "new": [...], "old": [...]}`` (live writers' are not
    listed), newest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|new|old)-(\d+)")
    found: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match[2])):
                found[match[1]].append(entry)
    for kind in found.values():
        kind.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def recover_directory(target: str | Path) -> None:
    """Finish or undo the replacement of ``target`` that a killed process left half-done: the newest complete copy
    (a ``new`` one, else an ``old`` one where the target is missing) is put at ``target``; partial copies and
    superseded ones are removed. Copies of live processes are left alone; a read-only place is left as it is."""
    target = Path(target)
    found = _leftovers(target)
    try:
        if found["new"]:
            if target.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
                os.rmdir(aside)
                os.replace(target, aside)
                found["old"].append(aside)
            os.replace(found["new"].pop(0), target)
        elif found["old"] and not target.exists():
            os.replace(found["old"].pop(0), target)
    except OSError:
        return
    for path in found["tmp"] + found["new"] + found["old"]:
        shutil.rmtree(path, ignore_errors=True)


def replace_file(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary sibling is filled, then renamed over ``path``
    (and removed if the write fails, a full disk say)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to fill; when the block ends without an error it replaces
    ``target`` (an existing one is renamed away first and removed only after), else it is removed. Files keep
    the permissions the process's umask gives (the temporary directory's own 0o700 is not kept).

    Example::

        with atomic_directory("run/checkpoint") as tmp:
            (tmp / "trainer.pt").write_bytes(...)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{pid}-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if not target.exists():
            os.replace(tmp, target)
            return
        new, old = (target.parent / f".{target.name}.{kind}-{pid}" for kind in ("new", "old"))
        for stale in (new, old):  # this process's own, from a save that failed part-way
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, new)  # complete: a kill from here on leaves it to recover_directory
        tmp = new
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open`` would under the umask: libraries
    that write through temporary files (safetensors) leave 0o600, which keeps other users and containers out."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(directory, name)
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~umask)
