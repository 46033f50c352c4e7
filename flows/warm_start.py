"""The nightly flow's warm start: the last blessed model becomes the next training's starting point.

When raw data changed since the last recorded run of the stages (the last commit of dvc.lock),
whether this run's versioning step (flows/versioning.py) committed it or someone did at a desk,
and params.yaml has train.warm_start on, this task copies paths.model into paths.warm_start
(imgpipe/model/warm_start.py says what train does with it) if it is the model the gate blessed
last, `dvc add`s it and commits it with its record, before the stages run. So the commit the run
trains on names the weights it starts from, and `dvc repro` of that commit trains the same model.

Only on new data: seeding on a night without any would change train's input and re-train for
nothing. A repository whose params.yaml has no `train` section (not this pipeline) is left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_cli import run_dvc_when_free
from flows.versioning import VersioningError, commit, data_changed_since_last_run, run_label, tracked
from imgpipe.core.atomic_write import atomic_path, write_json
from imgpipe.core.hashing import file_hexdigest
from imgpipe.core.params import PARAMS_FILE, ParamsError, params_from_dict
from imgpipe.evaluation.gate import read_blessed
from imgpipe.model import shards
from imgpipe.model.warm_start import MODEL, RECORD, read_record


def seed(root: Path, model: str, blessed_file: str, shards_folder: str, folder: str, log) -> dict | None:
    """Copy the model at `model` into `folder` (all relative to `root`) when it is the last
    blessed one and not there already; its record, or None when nothing was copied (logged why)."""
    model_path, target = root / model, root / folder
    records = read_blessed(root / blessed_file)
    if not model_path.is_file() or not records:
        log.info("warm start: no blessed model yet (%s); train starts from nothing", blessed_file)
        return None
    md5 = file_hexdigest(model_path, "md5")
    last = records[-1]
    if last["md5"] != md5:
        log.info("warm start: %s (md5 %s) is not the last blessed model (md5 %s); %s is left as it is",
                 model, md5, last["md5"], folder)
        return None
    current = read_record(target)
    if current is not None and current["md5"] == md5:
        log.info("warm start: %s already holds the last blessed model (md5 %s)", folder, md5)
        return None
    # the classes in the model's output order: those of the shards it was trained on
    record = {"classes": shards.read_meta(root / shards_folder)["classes"], "md5": md5,
              "blessed_at": last.get("blessed_at"), "metrics": last.get("metrics", {})}
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / MODEL) as tmp:
        shutil.copyfile(model_path, tmp)
    write_json(target / RECORD, record)
    return record


@task(name="warm start", task_run_name="warm start", cache_policy=NO_CACHE)
def refresh_warm_start(repo: str, lock_timeout: float) -> str | None:
    """Seed paths.warm_start with the last blessed model, `dvc add` and commit it; the commit
    id, or None when nothing changed (no blessed model, already there, warm start off)."""
    logger = get_run_logger()
    root = Path(repo)
    raw = yaml.safe_load((root / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    if "train" not in raw:
        logger.info("warm start: %s has no train section; nothing to seed", PARAMS_FILE)
        return None
    try:
        params = params_from_dict(raw)
    except ParamsError as exc:
        raise ParamsError(f"{root / PARAMS_FILE}: {exc}") from None
    if not params.train.warm_start:
        logger.info("warm start: off (train.warm_start: false)")
        return None
    folder = params.paths.warm_start
    target = f"{folder}/{MODEL}"
    changed, last_run = data_changed_since_last_run(repo, tracked(repo), frozenset({f"{target}.dvc"}))
    since = f"the last recorded run (commit {last_run})" if last_run else "no recorded run"
    if not changed:
        logger.info("warm start: no raw data changed since %s; nothing to seed", since)
        return None
    logger.info("warm start: raw data changed since %s: %s", since, ", ".join(changed))
    record = seed(root, params.paths.model, params.evaluate.blessed_file, params.paths.shards, folder, logger)
    if record is None:
        return None
    returncode, tail = run_dvc_when_free(repo, ["add", "-q", target], logger.info, lock_timeout)
    if returncode != 0:
        raise VersioningError(f"dvc add {target} failed (exit code {returncode}):\n" + "\n".join(tail))
    accuracy = record["metrics"].get("accuracy")
    figure = f", test accuracy {accuracy:.4f}" if isinstance(accuracy, float) else ""
    message = (f"Warm start: the model blessed {record['blessed_at']} (md5 {record['md5']}{figure})\n\n"
               f"By the Prefect flow run {run_label()}: new raw data arrived, so train starts from it.")
    sha = commit(repo, {f"{target}.dvc", f"{folder}/{RECORD}", f"{folder}/.gitignore"}, message)
    logger.info("warm start: %s holds the model blessed %s (md5 %s): commit %s", folder, record["blessed_at"],
                record["md5"], sha)
    return sha
