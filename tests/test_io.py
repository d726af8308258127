"""Atomic outputs: a writer killed mid-save leaves no final file, and its leftovers are removed
by the next writer of the same output (never a live writer's)."""

import os
import signal
import subprocess
import sys

import pytest

from quamba.errors import ConfigError
from quamba.io import atomic_dir, atomic_path, remove_stale_temps

KILLED_WRITER = """
import os, sys
from pathlib import Path
from quamba.io import atomic_dir, atomic_path
final = Path(sys.argv[1])
with (atomic_dir(final, "done") if sys.argv[2] == "dir" else atomic_path(final)) as tmp:
    (tmp / "part").write_text("half") if sys.argv[2] == "dir" else tmp.write_text("half")
    os.kill(os.getpid(), 9)
"""


def kill_mid_save(final, kind):
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(final), kind])
    assert run.returncode == -signal.SIGKILL
    return [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]


def test_a_killed_writers_leftovers_are_removed_by_the_next_writer(tmp_path):
    for kind, context in (("dir", lambda final: atomic_dir(final, "done")), ("file", atomic_path)):
        final = tmp_path / f"out-{kind}"
        leftovers = kill_mid_save(final, kind)
        assert len(leftovers) == 1 and not final.exists()
        with context(final) as tmp:
            (tmp / "done").write_text("ok") if kind == "dir" else tmp.write_text("ok")
        assert not any(p.exists() for p in leftovers) and final.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out-{kind}")) == []


def test_a_live_writers_temp_and_other_hosts_temps_stay(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final, "done") as mine:  # this process is alive: its temp is not stale
        assert remove_stale_temps(final) == [] and mine.exists()
    foreign = tmp_path / ".out.some-other-host-1.abc.tmp"
    foreign.mkdir()
    dead_here = tmp_path / f".out.{os.uname().nodename}-999999999.abc.tmp"  # no such pid
    dead_here.mkdir()
    assert remove_stale_temps(final) == [dead_here]
    assert foreign.exists() and not dead_here.exists()


def test_an_output_dir_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    """--out naming someone's directory must not delete it: only an earlier output (holding the
    kind's marker file) or an empty dir is replaced; a file is refused too."""
    mine, theirs, empty, afile = tmp_path / "mine", tmp_path / "theirs", tmp_path / "empty", tmp_path / "afile"
    for final in (mine, empty):
        final.mkdir()
    (mine / "gptq.json").write_text("{}")
    theirs.mkdir()
    (theirs / "notes.txt").write_text("important")
    afile.write_text("x")
    for final in (mine, empty):
        with atomic_dir(final, "gptq.json") as tmp:
            (tmp / "gptq.json").write_text("new")
        assert (final / "gptq.json").read_text() == "new"
    with pytest.raises(ConfigError, match="theirs: a non-empty directory that is no earlier output of this kind"):
        with atomic_dir(theirs, "gptq.json"):
            pass
    with pytest.raises(ConfigError, match="afile: exists and is not a directory"):
        with atomic_dir(afile, "gptq.json"):
            pass
    assert (theirs / "notes.txt").read_text() == "important" and afile.read_text() == "x"
