"""Warm start: a nightly training run starts from the last blessed model instead of from nothing.

<paths.warm_start>/ is an input of train (dvc.yaml), versioned like raw data, so that `dvc repro`
of any commit trains from the same weights and gives the same model:

- The nightly flow (flows/warm_start.py), when new raw data has arrived, puts the last blessed
  model there (model.keras, `dvc add`-ed, and warm_start.json, its record, kept in git) and
  commits both before the stages run. Only a model the gate blessed seeds a warm start.
- train (train.warm_start, on by default) then loads those weights and runs only its last phase
  (fine-tuning if there is one, else phase 1) for train.warm_start_epochs epochs. With no model
  there (a fresh project, a run at a desk), or one that does not fit (other classes, another
  backbone), it trains from nothing and says why.

To train from nothing again: `dvc remove <folder>/model.keras.dvc`, delete model.keras and
warm_start.json there, and commit; or set train.warm_start: false.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras

from imgpipe.core.errors import StageError
from imgpipe.core.hashing import file_hexdigest
from imgpipe.model import loading

log = logging.getLogger(__name__)

MODEL = "model.keras"
RECORD = "warm_start.json"


def read_record(folder: str | Path) -> dict | None:
    """The warm start's record (classes, md5, blessed_at), or None when the folder holds no model."""
    folder = Path(folder)
    if not (folder / MODEL).is_file() or not (folder / RECORD).is_file():
        return None
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        return {**record, "classes": list(record["classes"]), "md5": str(record["md5"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{folder / RECORD}: not a warm-start record ({exc}); delete the folder's "
                         f"{MODEL} and {RECORD} to train from nothing") from None


def load_into(model: keras.Model, folder: str | Path, classes: list[str]) -> dict | None:
    """Load the warm start's weights into `model` (a freshly built keras.Model); its record, or
    None when there is none or it does not fit (then `model` keeps its own weights; logged why)."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        log.info("warm start: no model in %s; training from nothing", folder)
        return None
    if record["classes"] != list(classes):
        log.warning("warm start: %s was trained on the classes %s, the shards hold %s; training from nothing",
                    folder / MODEL, record["classes"], list(classes))
        return None
    if file_hexdigest(folder / MODEL, "md5") != record["md5"]:
        raise StageError(f"{folder / MODEL}: its md5 is not the one {folder / RECORD} records; "
                         "the two were not written together (re-seed the folder or delete both)")
    # The whole saved model, then its weights by position: Keras' load_weights into another
    # structure can load part of it and leave the rest as built (with only a warning).
    saved = loading.load(folder / MODEL, trust=True)
    theirs, ours = saved.get_weights(), model.get_weights()
    mismatch = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a.shape != b.shape), None)
    if len(theirs) != len(ours) or mismatch is not None:
        where = (f"weight {mismatch}: {theirs[mismatch].shape} against {ours[mismatch].shape}"
                 if mismatch is not None else f"{len(theirs)} weight arrays against {len(ours)}")
        log.warning("warm start: %s does not fit this model (%s); training from nothing", folder / MODEL, where)
        return None
    model.set_weights(theirs)
    return record
