"""DVC's run-cache on a stage with a large folder dependency: its cost per `dvc repro`, side by side.

Why: ingest is the only stage that depends on the raw folder, and after +1% images most of its
`dvc repro` is DVC's own time. DVC's run-cache (the look-up before the command and the save after
it) hashes the stage's dependencies again: for a folder, a walk and a state look-up of every file.
A stage with a `persist: true` output has no run-cache (DVC's docs; dvc/stage/cache.py
`_can_hash`), so dvc.yaml marks one of ingest's outputs persist.

Two git + DVC repositories with the same folder of `--files` small files (`dvc add`-ed, as the raw
data is) and the same stage (`cmd` lists the folder into two output files, a stand-in for ingest's
manifest and its skipped-files count): in one, both outputs are plain; in the other, the second is
`persist: true`. Each round adds one file to both folders, then runs `dvc repro --single-item
list` in each, in alternating order, timed as a whole command (DVC's start-up, the dependency
check, the command, hashing and committing the outputs, the run-cache where there is one).

Usage: .venv/bin/python bench/dvc_runcache_bench.py [--files 70000] [--rounds 3]
(about 5 min at 70,000 files on 2 cores). bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# what the stage runs: the folder's listing, and a count beside it (both written whole every run)
LIST_CMD = ("python -c \"import os, json; names = sorted(os.listdir('raw')); "
            "open('listing.txt', 'w').write('\\n'.join(names)); "
            "json.dump({'files': len(names)}, open('listing.json', 'w'))\"")
QUIET = {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
         "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def sh(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, env={**os.environ, **QUIET}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {cwd}:\n{done.stdout}\n{done.stderr}")


def dvc(*args: str, cwd: Path) -> None:
    sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def make_repo(path: Path, files: int, persist: bool) -> Path:
    path.mkdir(parents=True)
    raw = path / "raw"
    raw.mkdir()
    for i in range(files):
        (raw / f"{i:07d}.txt").write_text(f"{i}\n")
    second = {"listing.json": {"persist": True}} if persist else "listing.json"
    stage = {"cmd": LIST_CMD, "deps": ["raw"], "outs": ["listing.txt", second]}
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"list": stage}}, sort_keys=False))
    sh("git", "init", "-q", cwd=path)
    dvc("init", "-q", cwd=path)
    dvc("config", "core.autostage", "false", cwd=path)
    dvc("add", "-q", "raw", cwd=path)
    dvc("repro", "-q", cwd=path)
    sh("git", "add", "-A", cwd=path)
    sh("git", "commit", "-qm", "data and a first run", cwd=path)
    return path


def timed_repro(repo: Path, new_file: str) -> float:
    (repo / "raw" / new_file).write_text("new\n")
    started = time.perf_counter()
    dvc("repro", "-q", "--single-item", "list", cwd=repo)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=70_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="dvc-runcache-bench-"))
    try:
        repos = {"run-cache (plain outputs)": make_repo(top / "plain", args.files, persist=False),
                 "no run-cache (one output persist)": make_repo(top / "persist", args.files, persist=True)}
        seconds: dict[str, list[float]] = {name: [] for name in repos}
        for round_ in range(args.rounds):
            order = list(repos) if round_ % 2 == 0 else list(reversed(repos))
            for name in order:
                seconds[name].append(timed_repro(repos[name], f"new-{round_}.txt"))
            print(f"round {round_ + 1}: " + ", ".join(f"{name} {seconds[name][-1]:.1f} s" for name in repos),
                  flush=True)
        with open("/proc/loadavg") as fh:
            load = fh.read().split()[:3]
        print(f"\n{args.files} files + 1 a round, {args.rounds} rounds, load average {' '.join(load)}")
        print("| stage's `dvc repro --single-item` | median (s) | each round (s) | x run-cache |")
        print("|---|---|---|---|")
        base = statistics.median(seconds[next(iter(repos))])
        for name, values in seconds.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / base:.2f} |")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
