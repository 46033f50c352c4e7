"""Atomic outputs: all or nothing, and a killed writer's leftovers removed by the next write."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.core.atomic_write import atomic_dir, atomic_path, write_text

ROOT = Path(__file__).resolve().parents[3]
# writes into a temporary sibling of the output, then waits to be killed
WRITER = """
import sys, time
from imgpipe.core.atomic_write import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "part").write_bytes(b"x" * 1_000_000)
    print("writing", flush=True)
    time.sleep(60)
"""


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_killed_writer_leaves_a_temporary_folder_the_next_write_removes(tmp_path):
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    litter = siblings(out)
    assert len(litter) == 1 and litter[0].startswith(".shards.") and litter[0].endswith(".tmp")

    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert siblings(out) == [] and (out / "done").read_text() == "ok"


def test_leftover_files_of_an_output_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "manifest.csv"
    for name in (".manifest.csv.abc123.tmp", ".manifest.csv.old", ".other.csv.abc.tmp", "notes.txt"):
        (tmp_path / name).write_text("stale")
    (tmp_path / ".manifest.csv.xyz.tmp").mkdir()
    write_text(out, "id\n")
    assert siblings(out) == [".other.csv.abc.tmp", "notes.txt"]
    assert out.read_text() == "id\n"


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "metrics.json"
    write_text(out, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed half-way")
    assert out.read_text() == "old" and siblings(out) == []
