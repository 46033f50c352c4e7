"""Predict: the exported model on new image files, preprocessed exactly as the preprocess stage does.

    imgpipe predict photo.jpg more/photos/           # a table on stdout
    imgpipe predict --format csv --output preds.csv photos/
    imgpipe predict --model models/export --format json photos/
    imgpipe predict --trust-model photos/              # a model with a TF Hub backbone

Reads <export dir>/model.keras (safe mode: a model file cannot run code; a model with a TF Hub
backbone runs its SavedModel's graph, so it loads only with --trust-model) and preprocess.json
(classes, preprocess params, normalisation stats), both written by the evaluate stage. Each file
goes through the preprocess stage's own functions (OpenCV decode, transform, normalize, the
shards' float16 rounding), so a test image gets the pixels, and the label, that evaluate saw.

A file that is not an image, or that cannot be decoded, gets a message on stderr and a row with
its error; the others still get predictions (`imgpipe predict --help` gives the exit statuses).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgpipe.images import formats
from imgpipe.model import loading
from imgpipe.model import shards
from imgpipe.core.errors import StageError
from imgpipe.model.export import MODEL, PREPROCESS, spec_preprocess
from imgpipe.core.params import PARAMS_FILE, ParamsError, Preprocess, load_params
from imgpipe.images.transforms import normalize, transform

BATCH_SIZE = 64


class PredictError(RuntimeError):
    """Nothing can be predicted (a missing or unsafe model, no inputs): one line, exit status 2."""


# -- inputs ----------------------------------------------------------------------------------


def list_inputs(paths: Iterable[str]) -> list[Path]:
    """The files named, and every non-hidden file below the folders named, each folder in sorted order."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files.append(path)  # a missing file gets its message when it is read
    return files


def pixels(data: bytes, p: Preprocess, spec: dict) -> np.ndarray:
    """An image file's bytes -> the float32 pixels the model takes; ValueError saying why not."""
    decoded = formats.decode(data, spec["max_pixels"])
    if not decoded.ok:
        raise ValueError(decoded.error)
    x = normalize(transform(decoded.image, p), p, spec["mean"], spec["std"])
    # the shards store float16: the model was trained and evaluated on pixels rounded to it
    return x.astype(shards.STORE_DTYPE).astype(np.float32)


# -- the model -------------------------------------------------------------------------------


def load_export(folder: str | Path, trust_model: bool = False):
    """(model, spec) from an export folder; PredictError naming what is missing or refused.

    The model loads in safe mode; one with a TF Hub backbone (a SavedModel layer, which runs that
    SavedModel's graph) only when `trust_model`, as any model file may be given here.
    """
    folder = Path(folder)
    spec_path, model_path = folder / PREPROCESS, folder / MODEL
    for path in (spec_path, model_path):
        if not path.is_file():
            raise PredictError(f"{path} not found; the evaluate stage exports the model there (dvc repro)")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    try:
        # safe mode: a model file holding Python code (a Lambda layer) is refused, not run; a TF
        # Hub backbone (a SavedModel's graph) only with --trust-model
        model = loading.load(model_path, trust=trust_model)
    except loading.UntrustedModel as exc:
        raise PredictError(f"{exc}; pass --trust-model if you trust the model and that SavedModel") from None
    except StageError as exc:
        raise PredictError(str(exc)) from None
    except (ValueError, TypeError, OSError) as exc:
        raise PredictError(f"{model_path}: cannot load the model safely: {exc}") from None
    if tuple(model.input_shape[1:]) != tuple(spec["input_shape"]) or model.output_shape[-1] != len(spec["classes"]):
        raise PredictError(f"{model_path} does not match {spec_path} (input shape or classes); re-export it")
    return model, spec


def predict(model, spec: dict, files: list[Path], batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """One result per file, in order: {path, label, confidence, probabilities, error}."""
    classes, p = spec["classes"], spec_preprocess(spec)
    batch: list[tuple[Path, np.ndarray]] = []

    def flush():
        probs = model.predict_on_batch(np.stack([x for _, x in batch]))
        for (path, _), p in zip(batch, probs):
            yield {"path": str(path), "label": classes[int(p.argmax())], "confidence": float(p.max()),
                   "probabilities": dict(zip(classes, map(float, p))), "error": ""}
        batch.clear()

    for path in tqdm(files, desc="predict", unit="img", file=sys.stderr, mininterval=1, disable=None):
        try:
            batch.append((path, pixels(path.read_bytes(), p, spec)))
        except Exception as exc:  # noqa: BLE001  (whatever is wrong with one file must not stop the others)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            tqdm.write(f"predict: {path}: skipped, {reason}", file=sys.stderr)
            yield {"path": str(path), "label": "", "confidence": None, "probabilities": {}, "error": reason}
            continue
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


# -- output ----------------------------------------------------------------------------------


def write_results(results: list[dict], classes: list[str], fmt: str, out) -> None:
    if fmt == "json":
        json.dump(results, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "label", "confidence", *(f"p_{c}" for c in classes), "error"])
        for r in results:
            probs = [_digits(r["probabilities"].get(c)) for c in classes]
            writer.writerow([r["path"], r["label"], _digits(r["confidence"]), *probs, r["error"]])
    else:
        width = max((len(r["path"]) for r in results), default=4)
        for r in results:
            if not r["error"]:
                out.write(f"{r['path']:<{width}}  {r['label']}  {r['confidence']:.4f}\n")


def _digits(value) -> str:
    return "" if value is None else f"{value:.6f}"


def default_model_dir() -> str:
    try:
        return load_params(PARAMS_FILE).evaluate.export_dir
    except ParamsError as exc:  # outside the project folder, or a broken params.yaml
        raise PredictError(f"cannot tell where the exported model is ({exc}); pass --model DIR") from None
