"""stage_main: one line of log with the stage's own work and the whole process's time."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3]


def test_the_log_says_the_run_and_the_whole_process_apart(tmp_path):
    """A stage that sleeps 0.3 s after an import-time sleep of 0.6 s: its run() counts only the
    first, the process both (a caller's wall time less the process is the caller's own)."""
    stage = tmp_path / "sleepy.py"
    stage.write_text(textwrap.dedent("""
        import time
        time.sleep(0.6)  # as an import would
        SECTIONS = ("base",)
        def run(base):
            time.sleep(0.3)
            deadline = time.process_time() + 0.4  # work on the CPU, as a stage's own process does
            while time.process_time() < deadline:
                pass
        if __name__ == "__main__":
            import sys
            from imgpipe.core.runner import stage_main
            sys.exit(stage_main(sys.modules[__name__]))
    """))
    (tmp_path / "params.yaml").write_text("base:\n  seed: 1\n")
    proc = subprocess.run([sys.executable, str(stage)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"done in ([0-9.]+) s \(process ([0-9.]+) s\); CPU of this process in it ([0-9.]+) s",
                      proc.stderr)
    assert found, proc.stderr
    run, process, cpu = map(float, found.groups())
    assert 0.7 <= run < 1.2
    assert process >= run + 0.6
    assert 0.4 <= cpu < 0.6  # the loop's CPU, not the sleeps
