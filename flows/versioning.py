"""A run that versions what it works on: new raw data before the stages, their records after.

With `version_data` on (the nightly deployment's default), the pipeline flow

1. refuses to start when git has uncommitted changes to tracked files other than the ones DVC
   writes (dvc.lock, `.dvc` files, metrics and plots files, its `.gitignore` entries), such as
   a param being edited or code in progress: the flow commits, and must neither commit someone's
   work in progress nor record results computed from it as if it were committed. DVC's own
   files left changed by a `dvc repro` at a desk are committed by the run;
2. runs `dvc add` on every path a `.dvc` file tracks (re-hashing only the files that changed)
   and, when a `.dvc` file changed, commits it: "Version raw data: data/raw (+20 added)";
3. runs the stages; after a successful run, commits what DVC wrote that git keeps: every
   dvc.lock, the outputs DVC does not cache (metrics and plots files), and the `.gitignore`
   entries DVC adds for new outputs. Nothing changed, nothing committed.

What the flow versions is every `dvc add`-ed path of the repository, the `.dvc` files DVC itself
finds (not `dvc import`s, which `dvc update` refreshes from their source): that is exactly what
the stages read as raw data, whatever params.yaml names, and nothing here knows the pipeline's
params. A raw folder nobody `dvc add`-ed yet is left alone.

The git commands run in the git repository that holds the DVC one (it may be a sub-folder).
"""

import json
import os
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dvc.repo import Repo
from dvc.stage import PipelineStage
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from flows.dvc_cli import run_dvc_when_free

# who commits when git knows no user here (a service account running the nightly deployment)
FALLBACK_IDENTITY = ("imgpipe flow", "imgpipe-flow@localhost")
# how many uncommitted paths a refusal names before it says "and N more"
LISTED_PATHS = 10


class VersioningError(RuntimeError):
    """The run will not version or commit: uncommitted work, no git repository, a failed command."""


@dataclass(frozen=True)
class Tracked:
    """What DVC writes in the repository that git keeps, as paths relative to its root."""

    # each `.dvc` file of `dvc add`-ed data -> the paths it tracks
    data: dict[str, list[str]]
    # .dvc files, dvc.lock files and the outputs DVC does not cache
    records: frozenset[str]
    # the .gitignore files DVC writes entries in, next to each cached output and added path
    gitignores: frozenset[str]
    # the dvc.lock files (among the records): what a run of the stages leaves
    locks: frozenset[str]

    @property
    def owned(self) -> frozenset[str]:
        """What a run may change and commit: DVC's records and its .gitignore entries."""
        return self.records | self.gitignores


def tracked(repo: str) -> Tracked:
    """What the DVC repository at `repo` versions, read with DVC's own API."""
    data, records, gitignores, locks = {}, set(), set(), set()
    with Repo(repo) as dvc_repo:
        root = dvc_repo.root_dir
        for stage in dvc_repo.index.stages:
            outs = [out for out in stage.outs if out.is_in_repo]
            paths = [os.path.relpath(out.fs_path, root) for out in outs]
            if isinstance(stage, PipelineStage):
                locks.add(os.path.splitext(stage.path_in_repo)[0] + ".lock")
            elif stage.is_data_source and not stage.deps:  # `dvc add`-ed; an import has a dep
                data[stage.path_in_repo] = paths
                records.add(stage.path_in_repo)
            for out, path in zip(outs, paths):
                if out.use_cache:
                    gitignores.add(os.path.join(os.path.dirname(path), ".gitignore"))
                else:
                    records.add(path)
    return Tracked(data, frozenset(records | locks), frozenset(gitignores), frozenset(locks))


# --- git ------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    # literal pathspecs: a file name with * or ? in it names that file only
    command = ["git", "--literal-pathspecs", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise VersioningError(f"`{' '.join(command)}` failed in {cwd}:\n{done.stderr.strip()}")
    return done.stdout


def _worktree(repo: str) -> tuple[Path, str]:
    """The git work tree holding `repo`, and `repo`'s path in it ("" or "sub/")."""
    try:
        top = _git(Path(repo), "rev-parse", "--show-toplevel").strip()
    except VersioningError as exc:
        raise VersioningError(f"{repo} is not in a git repository: version_data needs one to commit to") from exc
    return Path(top), _git(Path(repo), "rev-parse", "--show-prefix").strip()


def _changed(top: Path, paths: list[str] | None = None, untracked: bool = False) -> list[str]:
    """Paths (relative to `top`) that git sees changed, staged or not; among `paths` if given;
    untracked files too if `untracked` (never ignored ones)."""
    if paths is not None and not paths:
        return []
    args = ["status", "--porcelain=v1", "-z", f"--untracked-files={'all' if untracked else 'no'}"]
    fields = _git(top, *args, *(["--", *paths] if paths else [])).split("\0")
    changed, rest = [], iter(fields)
    for entry in rest:
        if entry:
            changed.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy: its source path follows
                changed.append(next(rest))
    return changed


def _under(path: str, owned: set[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in owned)


def uncommitted_foreign_changes(repo: str, owned: frozenset[str]) -> list[str]:
    """Tracked files of the git work tree with uncommitted changes, other than `owned` (paths
    relative to `repo`) and what is under them; as paths relative to the work tree."""
    top, prefix = _worktree(repo)
    mine = {str(PurePosixPath(prefix, path)) for path in owned}
    return [path for path in _changed(top) if not _under(path, mine)]


def commit(repo: str, paths: set[str], message: str) -> str | None:
    """Commit the changes to `paths` (relative to `repo`; untracked ones are added) and nothing
    else, even if more is staged; return the short commit id, or None when none changed."""
    top, prefix = _worktree(repo)
    changed = _changed(top, sorted(str(PurePosixPath(prefix, path)) for path in paths), untracked=True)
    if not changed:
        return None
    identity = []
    if subprocess.run(["git", "config", "user.email"], cwd=top, capture_output=True, check=False).returncode:
        identity = ["-c", f"user.name={FALLBACK_IDENTITY[0]}", "-c", f"user.email={FALLBACK_IDENTITY[1]}"]
    _git(top, "add", "--", *changed)
    _git(top, *identity, "commit", "--quiet", "--only", "--message", message, "--", *changed)
    return _git(top, "rev-parse", "--short", "HEAD").strip()


def run_label() -> str:
    """The Prefect flow run doing this, for commit messages."""
    name = flow_run.name or "?"
    return f"{name} of deployment {deployment.name}" if deployment.name else name


# --- what changed in the data ----------------------------------------------------------------


def data_changes(diff: dict, targets: list[str]) -> dict[str, Counter]:
    """Per target, how many files `dvc diff --json` lists as added, deleted, modified, renamed
    (a directory's own entry, ending in '/', is not a file)."""
    counts = {target: Counter() for target in targets}
    for kind in ("added", "deleted", "modified", "renamed"):
        for entry in diff.get(kind, []):
            path = entry["path"]
            if isinstance(path, dict):  # a rename: {"old": ..., "new": ...}
                path = path["new"]
            if path.endswith(("/", os.sep)):
                continue
            for target in targets:
                if path == target or path.startswith(target.rstrip("/\\") + os.sep):
                    counts[target][kind] += 1
    return counts


def describe_changes(counts: dict[str, Counter]) -> str:
    """data/raw (+20 added, 1 deleted), labels.csv (1 modified)"""
    parts = []
    for target, count in counts.items():
        figures = [f"{'+' if kind == 'added' else ''}{count[kind]} {kind}" for kind in count if count[kind]]
        parts.append(f"{target} ({', '.join(figures)})" if figures else target)
    return ", ".join(parts)


def _diff(repo: str, targets: list[str], lock_timeout: float) -> dict | None:
    lines: list[str] = []
    returncode, _ = run_dvc_when_free(repo, ["diff", "--json", "HEAD", "--targets", *targets], lines.append, lock_timeout)
    # the JSON is one line; the others would say that DVC was busy
    found = [line for line in lines if line.startswith("{")]
    if returncode != 0 or not found:
        return None
    return json.loads(found[-1])


def data_changed_since_last_run(repo: str, found: Tracked, leave_out: frozenset[str] = frozenset()) -> tuple[list[str], str | None]:
    """The `.dvc` files of `dvc add`-ed data (but `leave_out`) that changed in git since the last
    commit of a dvc.lock file, i.e. data the last recorded run of the stages did not see, whether a
    flow run or someone at a desk committed it (paths from the git work tree's top); and that
    commit's id (None: no run recorded yet, so every data file counts as changed)."""
    top, prefix = _worktree(repo)
    data = [str(PurePosixPath(prefix, f)) for f in sorted(found.data) if f not in leave_out]
    locks = [str(PurePosixPath(prefix, f)) for f in sorted(found.locks)]
    last = _git(top, "log", "-1", "--format=%h", "--", *locks).strip() if locks and data else ""
    if not last:
        return data, None
    return _git(top, "diff", "--name-only", last, "HEAD", "--", *data).split(), last


# --- the flow's tasks ------------------------------------------------------------------------


@task(name="check git work tree", task_run_name="check git work tree", cache_policy=NO_CACHE)
def check_worktree(repo: str) -> None:
    """Refuse (VersioningError) when uncommitted changes other than DVC's records are there."""
    foreign = uncommitted_foreign_changes(repo, tracked(repo).owned)
    if foreign:
        listed = ", ".join(foreign[:LISTED_PATHS])
        more = f" and {len(foreign) - LISTED_PATHS} more" if len(foreign) > LISTED_PATHS else ""
        raise VersioningError(
            f"refusing to version data and commit in {repo}: uncommitted changes to {listed}{more}, "
            "which this flow does not write. Commit or stash them first, or run without "
            "versioning (version_data off: `imgpipe flow run` without --version-data, "
            "`imgpipe flow deploy --no-version-data`)."
        )
    get_run_logger().info("git work tree: no uncommitted changes besides DVC's own records")


@task(name="version raw data", task_run_name="version raw data", cache_policy=NO_CACHE)
def version_raw_data(repo: str, lock_timeout: float) -> str | None:
    """`dvc add` every `dvc add`-ed path; commit the `.dvc` files that changed. Returns the
    commit id, or None when the data had not changed."""
    logger = get_run_logger()
    data = tracked(repo).data
    targets = [path for paths in data.values() for path in paths]
    if not targets:
        logger.info("no `dvc add`-ed data in %s: nothing to version", repo)
        return None
    logger.info("versioning %s", ", ".join(targets))
    # -q: DVC's hint to `git add` the .dvc files is this task's job
    returncode, tail = run_dvc_when_free(repo, ["add", "-q", *targets], logger.info, lock_timeout)
    if returncode != 0:
        raise VersioningError(f"dvc add failed (exit code {returncode}):\n" + "\n".join(tail))
    top, prefix = _worktree(repo)
    changed_files = set(_changed(top, [str(PurePosixPath(prefix, f)) for f in data], untracked=True))
    changed = [t for f, paths in data.items() if str(PurePosixPath(prefix, f)) in changed_files for t in paths]
    if not changed:
        logger.info("raw data unchanged: nothing to commit")
        return None
    diff = _diff(repo, changed, lock_timeout)
    what = describe_changes(data_changes(diff, changed)) if diff is not None else ", ".join(changed)
    gitignores = {os.path.join(os.path.dirname(t), ".gitignore") for t in changed}
    message = f"Version raw data: {what}\n\nBy the Prefect flow run {run_label()}, before its stages ran."
    sha = commit(repo, set(data) | gitignores, message)
    logger.info("versioned %s: commit %s", what, sha)
    return sha


@task(name="commit run", task_run_name="commit run", cache_policy=NO_CACHE)
def commit_run(repo: str, results: dict[str, dict]) -> str | None:
    """After a successful run: commit the dvc.lock files, the uncached outputs and DVC's
    .gitignore entries. Returns the commit id, or None when the run changed none of them."""
    logger = get_run_logger()
    found = tracked(repo)
    # the stages take minutes: refuse to record them against work begun meanwhile
    foreign = uncommitted_foreign_changes(repo, found.owned)
    if foreign:
        raise VersioningError(
            f"the stages ran, but {', '.join(foreign[:LISTED_PATHS])} changed during the run: "
            "dvc.lock is left uncommitted, since it may not match what is committed"
        )
    ran = [stage for stage, result in results.items() if result["status"] == "ran"]
    skipped = [stage for stage, result in results.items() if result["status"] != "ran"]
    message = (
        f"Pipeline run {run_label()}: {'ran ' + ', '.join(ran) if ran else 'no stage ran'}\n\n"
        f"Skipped (up to date): {', '.join(skipped) or 'none'}. Committed by the flow: dvc.lock "
        "and the outputs git keeps, as the run left them."
    )
    # .dvc files too: a data source that changed after "version raw data" was re-hashed by its
    # stage, and dvc.lock records the new hash
    sha = commit(repo, set(found.owned), message)
    if sha:
        logger.info("committed the run's records: commit %s", sha)
    else:
        logger.info("the run changed no record git keeps: nothing to commit")
    return sha
