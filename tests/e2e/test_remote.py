"""A DVC remote shares data and pipeline outputs between machines: `dvc push` on one, `git clone`
plus `dvc pull` on another, real DVC both times.

Two remotes: a local folder (as a mounted network drive would be), and S3, served on loopback by
moto's server mode with made-up credentials (dvc-s3 talks to it as to AWS).
"""

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.e2e.helpers import S3_ENV, commit, dvc, git_dvc_repo, s3_server, sh

# starts a server or a cluster, or runs the pipeline: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
FLOWERS = PROJECT.parent / "shared" / "datasets" / "flowers5-128px" / "flowers"
BUCKET = "imgpipe-test"
# The stage's output: how many bytes each photo has, one line per photo.
STAGES = {
    "sizes": {
        "cmd": "wc -c photos/*.jpg > sizes.txt",
        "deps": ["photos"],
        "outs": ["sizes.txt"],
    }
}


def digests(root: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of each file under `paths` (files or folders), by its path in `root`."""
    files = []
    for path in (root / p for p in paths):
        files += sorted(path.rglob("*.*")) if path.is_dir() else [path]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def s3_endpoint():
    with s3_server(BUCKET) as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def remote(request, tmp_path) -> tuple[list[list[str]], dict]:
    """(the `dvc remote` commands that set the remote up, the environment DVC needs for it)"""
    if request.param == "local":
        return [["remote", "add", "-d", "storage", str(tmp_path / "remote")]], {}
    endpoint = request.getfixturevalue("s3_endpoint")
    commands = [
        ["remote", "add", "-d", "storage", f"s3://{BUCKET}/imgpipe"],
        ["remote", "modify", "storage", "endpointurl", endpoint],
    ]
    # empty AWS config files: nothing from this machine's ~/.aws (a profile, an endpoint) applies
    empty = tmp_path / "aws-config"
    empty.touch()
    no_aws_files = {"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    return commands, {**S3_ENV, **no_aws_files}


def test_push_on_one_machine_and_pull_on_another(remote, tmp_path):
    commands, env = remote
    origin = git_dvc_repo(tmp_path / "origin", STAGES, {})
    (origin / "photos").mkdir()
    for photo in sorted((FLOWERS / "daisy").iterdir())[:5]:
        shutil.copy(photo, origin / "photos")
    dvc("add", "-q", "photos", cwd=origin)
    for command in commands:
        dvc(*command, cwd=origin)
    dvc("repro", "-q", cwd=origin)
    commit(origin, "photos, their sizes, and the remote")
    tracked = digests(origin, ["photos", "sizes.txt"])
    assert len(tracked) == 6

    pushed = dvc("push", cwd=origin, env=env).stdout
    assert "7 files pushed" in pushed  # 5 photos, the directory's listing, sizes.txt

    # another machine: the git repository only, an empty DVC cache
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / "photos").exists() and not (clone / ".dvc" / "cache").exists()
    dvc("pull", cwd=clone, env=env)

    assert digests(clone, ["photos", "sizes.txt"]) == tracked
    # the pulled outputs are the pipeline's current ones: nothing to re-run
    assert "Data and pipelines are up to date." in dvc("status", cwd=clone).stdout
