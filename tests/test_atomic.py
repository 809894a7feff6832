"""atomic_directory: a process killed at any point of a save leaves a complete copy at the target's name
(after :func:`recover_directory`), and no temporary directories behind."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from hyla.atomic import atomic_directory, recover_directory

# A child process that replaces DIR/checkpoint (holding "old") with one holding "new", and kills itself with
# SIGKILL at the os.replace call number KILL_AT (1: the filled copy renamed .new, 2: the old one moved aside,
# 3: the new one moved in), or while filling (KILL_AT 0).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from hyla.atomic import atomic_directory
    target, kill_at = Path(sys.argv[1]) / "checkpoint", int(sys.argv[2])
    real, calls = os.replace, []
    def replace(a, b):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)
    os.replace = replace
    with atomic_directory(target) as tmp:
        (tmp / "state").write_text("new-part")
        if kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / "state").write_text("new")
""")


@pytest.mark.parametrize("kill_at, survivor", [(0, "old"), (1, "old"), (2, "new"), (3, "new")])
def test_a_save_killed_at_any_point_recovers_a_complete_copy(tmp_path, kill_at, survivor):
    with atomic_directory(tmp_path / "checkpoint") as tmp:
        (tmp / "state").write_text("old")
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(kill_at)], capture_output=True)
    assert child.returncode == -9, child.stderr
    recover_directory(tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "state").read_text() == survivor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # nothing left behind


def test_a_live_writers_files_are_left_alone(tmp_path):
    busy = tmp_path / f".checkpoint.tmp-{os.getpid()}-abc"
    busy.mkdir()
    recover_directory(tmp_path / "checkpoint")
    assert busy.is_dir()


def test_files_keep_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            fd = os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as a temp-file writer leaves it
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "d", *(tmp_path / "d").iterdir()]}
    assert modes == {"d": 0o755, "private": 0o644, "sub": 0o755}


def test_replace_file_is_whole_or_nothing(tmp_path, monkeypatch):
    from hyla.atomic import replace_file

    path = tmp_path / "train.json"
    replace_file(path, "old")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        replace_file(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["train.json"]
