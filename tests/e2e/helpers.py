"""What the end-to-end tests share: temporary git + DVC repositories, reading a real server, and
rendering a page in headless Chromium with no network."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

# No telemetry from anything these tests start (DVC has its own switch).
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
GIT_AUTHOR = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
# Debian's chromium package; without it the browser tests are skipped
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)")


# moto accepts any credentials; made-up ones, so that no real ones are looked up and sent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def s3_server(bucket: str):
    """An S3 server on loopback (moto's server mode) holding an empty `bucket`; yields its URL."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        session.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()


def sh(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure, raise with its output (a bare exit code explains nothing)."""
    env = {**os.environ, **QUIET_ENV, **(env or {})}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def dvc(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env)


def commit(repo: Path, message: str = "change") -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", *GIT_AUTHOR, "commit", "-qm", message, cwd=repo)


def git_dvc_repo(path: Path, stages: dict, params: dict, extra: dict | None = None) -> Path:
    """A committed git + DVC repository at `path`: dvc.yaml with `stages` (and `extra` top-level
    entries such as `vars`), params.yaml with `params`; the caller may have put files there."""
    path.mkdir(exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = {**(extra or {}), "stages": stages}
    (path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sh("git", "init", "-q", cwd=path)
    dvc("init", "-q", cwd=path)
    commit(path, "init")
    return path


def eventually(check, timeout: float = 20):
    """Poll `check` until it returns something truthy, and return that (or the last falsy value).

    The server records task runs from events and receives logs in batches, so both arrive a
    moment after the flow run has finished.
    """
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


def artifacts(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, list]:
    """The flow run's artifacts on the server by key, oldest first; table data decoded."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    by_key: dict[str, list] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        if artifact.type == "table":
            artifact.data = json.loads(artifact.data)
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


# --- pages in a browser with no network -------------------------------------------------------

# no request can leave: host names resolve to nothing, and what is not a file goes to a proxy on
# a loopback port nothing listens on (the discard port)
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9"]

# Added at the end of a copy of the page: after the load event and the scripts' first frames,
# record in <body> what the page's libraries did, where --dump-dom shows it.
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const body = document.body, note = (name, value) => body.setAttribute("data-probe-" + name, String(value));
  note("jquery", typeof window.jQuery);
  note("bootstrap-table", typeof (window.jQuery && window.jQuery.fn.bootstrapTable));
  note("vega-embed", typeof window.vegaEmbed);
  const hidden = document.createElement("div");  // Bootstrap's stylesheet hides .d-none
  hidden.className = "d-none";
  body.appendChild(hidden);
  note("bootstrap-css", getComputedStyle(hidden).display);
  hidden.remove();
  // Font Awesome's stylesheet and its web font, loaded for the page's icons
  note("font-awesome", [...document.fonts].some(f => f.family.includes("Font Awesome") && f.status === "loaded"));
  // each plot: its canvas and how many of its pixels are not the white background
  for (const plot of document.querySelectorAll("div.vega-embed")) {
    const canvas = plot.querySelector("canvas");
    let inked = 0;
    if (canvas) {
      const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 0; i < pixels.length; i += 4)
        if (pixels[i + 3] > 0 && (pixels[i] < 250 || pixels[i + 1] < 250 || pixels[i + 2] < 250)) inked++;
    }
    plot.setAttribute("data-probe", JSON.stringify(
      {canvas: canvas ? [canvas.width, canvas.height] : null, inked: inked, svg: plot.querySelectorAll("svg *").length}));
  }
  // each image: its decoded width (0: it did not load)
  for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);
  note("done", "yes");
}, 1000));
</script>"""


def rendered_dom(page: Path, profile: Path) -> tuple[str, dict[str, str]]:
    """The DOM of `page` after its scripts ran, in Chromium with no network, and what PROBE noted."""
    text = page.read_text(encoding="utf-8")
    # the last </body>: the inlined libraries hold the string too
    head, _, tail = text.rpartition("</body>")
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(head + PROBE + "</body>" + tail, encoding="utf-8")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
         *OFFLINE, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    probe.unlink()
    assert proc.returncode == 0, proc.stderr
    # the last <body: the inlined libraries hold the string too
    body = re.findall(r"<body\b([^>]*)>", proc.stdout)[-1]
    notes = dict(re.findall(r'data-probe-([a-z-]+)="([^"]*)"', body))
    assert notes.get("done") == "yes", "the page's load event never fired"
    return proc.stdout, notes


def natural_widths(dom: str) -> dict[str, int]:
    """src -> decoded width of every image in a DOM from rendered_dom (0: the image did not load)."""
    return {src: int(width) for src, width in
            re.findall(r'<img [^>]*src="([^"]+)"[^>]*data-natural-width="(\d+)"', dom)}
