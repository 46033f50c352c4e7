"""Loading a saved .keras model: in Keras' safe mode, unless it holds a TF Hub SavedModel layer.

A .keras file is a zip archive whose config.json describes every layer. Keras' safe mode refuses
the layers that run code from outside the model's weights: Lambda (Python code) and TFSMLayer
(the graph of a SavedModel on disk: how a TF Hub backbone is held, imgpipe/model/backbones.py).
config.json tells which a model holds before any of it is deserialised:

- no TFSMLayer: the model loads with safe_mode=True, always (Keras then refuses a Lambda layer);
- a TFSMLayer: it loads only with safe_mode=False, and only when the caller trusts it (`trust`):
  evaluate does, for the model this pipeline's train stage made; predict only with --trust-model.
  Keras' safe mode is all or nothing, so such a model must hold no Python code besides.

A TFSMLayer keeps the path of its SavedModel (its config's `filepath`), not the SavedModel: the
model loads only where that folder is. It is checked first, for an error naming it.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import keras

import imgpipe.model.builder  # noqa: F401  (registers the custom layers a trained model may hold, before loading)
from imgpipe.core.errors import StageError

CONFIG = "config.json"
log = logging.getLogger(__name__)
SAVEDMODEL_LAYER = "TFSMLayer"
# What else safe mode guards against in a config: Python code (a Lambda layer, a serialised lambda)
PYTHON_CODE = ("Lambda", "__lambda__")


class UntrustedModel(StageError):
    """The model loads only with safe_mode=False (a TF Hub SavedModel layer) and the caller does not trust it."""


def read_config(path: str | Path) -> dict:
    """The model's config.json, read from the .keras archive without deserialising anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(CONFIG))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise StageError(f"{path}: not a .keras model file ({exc})") from None


def _objects(node):
    """Every serialised object ({"class_name": ..., "config": ...}) in a config, depth first."""
    if isinstance(node, dict):
        if "class_name" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def savedmodel_paths(path: str | Path) -> list[str]:
    """The SavedModel folder of each TFSMLayer of the model at `path`; empty: it loads in safe mode."""
    return _savedmodels(list(_objects(read_config(path))))


def _savedmodels(objects: list[dict]) -> list[str]:
    return [obj["config"]["filepath"] for obj in objects if obj["class_name"] == SAVEDMODEL_LAYER]


def load(path: str | Path, trust: bool = False) -> keras.Model:
    """The model at `path` (not compiled): safe mode, or not when it holds a TF Hub SavedModel layer and `trust`.

    StageError (UntrustedModel when not trusted) naming the file and what stops it; errors of
    Keras' own loading (a Lambda layer refused in safe mode, a broken file) pass through.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: model not found")
    objects = list(_objects(read_config(path)))
    savedmodels = _savedmodels(objects)
    if savedmodels:
        if not trust:
            raise UntrustedModel(
                f"{path} holds a TF Hub SavedModel layer ({', '.join(savedmodels)}), which runs that SavedModel's "
                "graph: Keras loads it only with safe_mode=False"
            )
        code = sorted({obj["class_name"] for obj in objects if obj["class_name"] in PYTHON_CODE})
        if code:
            # safe_mode=False would run this code too, and no model of this pipeline holds any
            raise StageError(f"{path}: refused: besides its TF Hub SavedModel layer it holds Python code ({', '.join(code)})")
        for folder in savedmodels:
            if not any((Path(folder) / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
                raise StageError(
                    f"{path}: its TF Hub backbone, the SavedModel {folder}, is not there (moved or deleted?); the "
                    "model file holds only that path: put the SavedModel back there, or re-run train"
                )
        log.info("loading %s with safe_mode=False: its TF Hub backbone is a SavedModel layer (%s), trusted by "
                 "the caller", path, ", ".join(savedmodels))
    return keras.saving.load_model(path, compile=False, safe_mode=not savedmodels)
