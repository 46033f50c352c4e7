"""Typed view of params.yaml: one frozen dataclass per section, loaded once.

Unknown keys and wrong types are errors that name the key, because a typo in params.yaml
(`train.epoch: 10`) would otherwise be ignored silently and the run would use a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds an unknown key or a bad value."""


@dataclass(frozen=True)
class Base:
    seed: int = 42


@dataclass(frozen=True)
class Paths:
    manifest: str = "data/interim/manifest.csv"
    accepted: str = "data/interim/accepted.csv"
    split: str = "data/interim/split.csv"
    split_state: str = "data/interim/split_state.csv"
    shards: str = "data/shards"
    rebalance: str = "data/rebalance"
    model: str = "models/model.keras"
    warm_start: str = "models/warm_start"
    train_log: str = "reports/train_log.csv"
    reports: str = "reports"
    data_quality: str = "reports/data_quality"


@dataclass(frozen=True)
class Ingest:
    source: str = "data/raw/fashion-mnist"
    layout: Literal["auto", "folders", "csv", "idx"] = "auto"
    labels_csv: str = "labels.csv"
    max_pixels: int = 100_000_000

    def check(self) -> None:
        if self.max_pixels < 1:
            raise ParamsError(f"ingest.max_pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class Runtime:
    """How fast the stages run, never what they write: no stage lists this section in dvc.yaml."""

    # ingest's and preprocess's worker processes (0 = one per CPU core)
    workers: int = 0
    # where ingest's and preprocess's per-image work and train's embedding cache run: local (a process pool;
    # train: its own process) | dask (a Dask cluster: the one at `scheduler`, e.g. tcp://10.0.0.5:8786, or with ""
    # a local cluster of `workers` processes)
    executor: Literal["local", "dask"] = "local"
    scheduler: str = ""
    # what ingest learnt of each file, kept between runs ("" = off); see imgpipe/data/facts_cache.py
    ingest_cache_dir: str = ".cache/ingest"
    # cached backbone features, the state of unfinished training runs, evaluate's predictions
    train_cache_dir: str = ".cache/train"

    def check(self) -> None:
        if self.workers < 0:
            raise ParamsError(f"runtime.workers must be >= 0 (0 = one per CPU core), got {self.workers}")


@dataclass(frozen=True)
class Validate:
    min_width: int = 8
    min_height: int = 8
    max_width: int = 8192
    max_height: int = 8192
    allowed_channels: tuple[int, ...] = (1, 3, 4)
    classes: tuple[str, ...] = ()
    min_images_per_class: int = 10
    max_imbalance_ratio: float = 10.0
    max_quarantined_fraction: float = 0.05
    near_duplicate_distance: int = 0
    min_sharpness: float = 5.0
    min_brightness: float = 10.0
    max_brightness: float = 245.0
    min_contrast: float = 8.0

    def check(self) -> None:
        if not 0.0 <= self.max_quarantined_fraction <= 1.0:
            raise ParamsError("validate.max_quarantined_fraction must be between 0 and 1")
        if self.max_imbalance_ratio < 1.0:
            raise ParamsError(f"validate.max_imbalance_ratio must be >= 1, got {self.max_imbalance_ratio}")
        if not 0 <= self.near_duplicate_distance <= 16:
            raise ParamsError("validate.near_duplicate_distance must be between 0 and 16 bits of the 64-bit perceptual "
                              f"hash (unrelated images differ in about 32), got {self.near_duplicate_distance}")
        if not 0.0 <= self.min_brightness <= self.max_brightness <= 255.0:
            raise ParamsError("validate.min_brightness and validate.max_brightness must satisfy "
                              f"0 <= min <= max <= 255, got {self.min_brightness} and {self.max_brightness}")
        if len(set(self.classes)) != len(self.classes) or any(not c.strip() for c in self.classes):
            raise ParamsError(f"validate.classes must be distinct, non-blank class names, got {list(self.classes)}")


@dataclass(frozen=True)
class Split:
    method: Literal["hash", "source"] = "source"
    test_buckets: tuple[int, int] = (0, 25)
    val_buckets: tuple[int, int] = (26, 51)
    balance: bool = True
    max_train_per_class: int = 0
    max_val_per_class: int = 0

    def check(self) -> None:
        for name in ("test_buckets", "val_buckets"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 255:
                raise ParamsError(f"split.{name} must be [first, last] with 0 <= first <= last <= 255, got {[lo, hi]}")
        (t0, t1), (v0, v1) = self.test_buckets, self.val_buckets
        if t0 <= v1 and v0 <= t1:
            raise ParamsError(f"split.test_buckets {[t0, t1]} and split.val_buckets {[v0, v1]} overlap")
        if self.max_train_per_class < 0 or self.max_val_per_class < 0:
            raise ParamsError("split.max_train_per_class and split.max_val_per_class must be >= 0 (0 = no cap)")


@dataclass(frozen=True)
class Preprocess:
    colour_mode: Literal["grey", "rgb"] = "grey"
    blur_kernel: int = 0
    otsu: bool = False
    size: tuple[int, int] = (32, 32)
    normalization: Literal["none", "unit", "minmax", "standardize"] = "unit"
    standardize_scope: Literal["sample", "dataset"] = "dataset"
    images_per_shard: int = 2048

    def check(self) -> None:
        if self.blur_kernel < 0 or (self.blur_kernel and self.blur_kernel % 2 == 0):
            raise ParamsError(f"preprocess.blur_kernel must be 0 (off) or an odd number, got {self.blur_kernel}")
        if self.otsu and self.colour_mode != "grey":
            raise ParamsError("preprocess.otsu needs preprocess.colour_mode: grey (Otsu thresholds one channel)")
        if min(self.size) < 1:
            raise ParamsError(f"preprocess.size must be two positive numbers [height, width], got {list(self.size)}")
        if self.images_per_shard < 1:
            raise ParamsError("preprocess.images_per_shard must be >= 1")


@dataclass(frozen=True)
class Rebalance:
    method: Literal["none", "oversample", "undersample", "class_weight"] = "none"


Backbone = Literal["mobilenet", "mobilenet_v2", "efficientnet_b0", "vgg16", "hub", "lenet", "cnn", "auto"]
# the backbones learnt from scratch (no pretrained weights, trained whole in phase 1)
FROM_SCRATCH = ("lenet", "cnn")


@dataclass(frozen=True)
class Train:
    # the model
    backbone: Backbone = "auto"
    alpha: float = 0.25
    weights: str = "imagenet"
    hub_handle: str = ""
    hub_endpoint: str = "serving_default"
    backbone_size: int = 96
    dropout: float = 0.3
    # phase 1: the head on the frozen backbone (lenet, cnn: the whole network)
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 3e-3
    # phase 2: fine-tuning the top of the backbone
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    # callbacks
    restore_best: bool = True
    early_stopping_patience: int = 0
    reduce_lr_patience: int = 0
    reduce_lr_factor: float = 0.2
    # input and hardware
    shuffle_buffer: int = 4096
    deterministic: bool = True
    embedding_cache: bool = True
    mixed_precision: bool = False
    # augmentation (training only)
    augment_flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    augment_rotation: float = 0.0
    augment_shift: float = 0.0
    augment_zoom: float = 0.0
    augment_shear: float = 0.0
    augment_fill_mode: Literal["reflect", "wrap", "constant", "nearest"] = "reflect"
    augment_in_phase1: bool = True
    augment_brightness: float = 0.0
    augment_contrast: float = 0.0
    erasing_probability: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 0.4)
    erasing_aspect: tuple[float, float] = (0.3, 3.3)
    erasing_values: tuple[float, float] = (0.0, 255.0)
    erasing_per_pixel: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: float = 0.5
    # batch-level mixing (soft labels), training only
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # loss, optimizer, schedule
    label_smoothing: float = 0.1
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float = 1.0
    ema_momentum: float = 0.0
    jit_compile: bool = False
    warm_start: bool = True
    warm_start_epochs: int = 2

    @property
    def pretrained(self) -> bool:
        """A pretrained backbone is frozen in phase 1; lenet and cnn learn from scratch (auto: not resolved yet)."""
        return self.backbone not in FROM_SCRATCH

    @property
    def mixes(self) -> bool:
        """Batches mixed by mixup or cutmix (their labels are soft)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def soft_labels(self) -> bool:
        """Labels as class probabilities (one-hot, mixed, smoothed) and a categorical loss, not class indices."""
        return self.mixes or self.label_smoothing > 0

    @property
    def augments(self) -> bool:
        return (self.augment_flip != "none" or self.erasing_probability > 0 or self.randaugment_ops > 0
                or self.mixes or any((self.augment_rotation, self.augment_shift, self.augment_zoom,
                                      self.augment_shear, self.augment_brightness, self.augment_contrast)))

    @property
    def augments_phase1(self) -> bool:
        return self.augments and self.augment_in_phase1

    @property
    def phase1_flip(self) -> str | None:
        """The flip of phase 1 ("none" when it does not augment), or None when it augments beyond flips.

        A frozen backbone's features of a flipped image are a second fixed view of it, which the
        embedding cache can hold; any other augmentation makes new pixels every epoch."""
        if not self.augments_phase1:
            return "none"
        only_flip = not dataclasses.replace(self, augment_flip="none").augments
        return self.augment_flip if only_flip else None

    def check(self) -> None:
        smallest = 8 if self.backbone in ("lenet", "cnn", "auto") else 32
        if self.backbone_size < smallest:
            raise ParamsError(f"train.backbone_size must be >= {smallest} for {self.backbone}, got {self.backbone_size}")
        if self.backbone == "hub" and not self.hub_handle:
            raise ParamsError("train.backbone hub needs train.hub_handle (a TF Hub URL or a SavedModel folder)")
        if self.backbone in FROM_SCRATCH and self.weights == "imagenet":
            raise ParamsError(f"train.weights: {self.backbone} learns from scratch, there are no ImageNet weights; "
                              "set none or a weights file")
        if self.epochs < 1 or self.batch_size < 1 or self.shuffle_buffer < 1:
            raise ParamsError("train.epochs, train.batch_size and train.shuffle_buffer must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"train.dropout must be >= 0 and < 1, got {self.dropout}")
        if self.learning_rate <= 0 or self.fine_tune_learning_rate <= 0:
            raise ParamsError("train.learning_rate and train.fine_tune_learning_rate must be > 0")
        if self.fine_tune_epochs < 0 or self.fine_tune_layers < 0:
            raise ParamsError("train.fine_tune_epochs and train.fine_tune_layers must be >= 0 (0 = no fine-tuning)")
        if self.fine_tune_epochs and not self.fine_tune_layers:
            raise ParamsError("train.fine_tune_epochs needs train.fine_tune_layers >= 1 (how many top layers to unfreeze)")
        if self.fine_tune_epochs and self.backbone in ("hub", *FROM_SCRATCH):
            raise ParamsError(f"train.fine_tune_epochs: a {self.backbone} backbone cannot be fine-tuned "
                              "layer by layer; set 0")
        if self.augments and not self.augment_in_phase1 and not self.fine_tune_epochs:
            raise ParamsError("train.augment_in_phase1 is false and there is no phase 2 (train.fine_tune_epochs): "
                              "the augmentation set would never apply (the default train.augment_flip is "
                              "horizontal: set it to none, or train.augment_in_phase1: true)")
        if self.early_stopping_patience < 0 or self.reduce_lr_patience < 0:
            raise ParamsError("train.early_stopping_patience and train.reduce_lr_patience must be >= 0 (0 = off)")
        if not 0.0 < self.reduce_lr_factor < 1.0:
            raise ParamsError(f"train.reduce_lr_factor must be between 0 and 1, got {self.reduce_lr_factor}")
        if not 0.0 <= self.augment_rotation <= 180.0:
            raise ParamsError(f"train.augment_rotation is in degrees, 0 to 180; got {self.augment_rotation}")
        for name in ("augment_shift", "augment_zoom", "augment_shear", "augment_brightness", "augment_contrast",
                     "erasing_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamsError(f"train.{name} must be between 0 and 1, got {getattr(self, name)}")
        (a0, a1), (r0, r1), (v0, v1) = self.erasing_area, self.erasing_aspect, self.erasing_values
        if not 0.0 < a0 <= a1 <= 1.0:
            raise ParamsError("train.erasing_area must be [min, max] fractions of the image, "
                              f"0 < min <= max <= 1; got {[a0, a1]}")
        if not 0.0 < r0 <= r1:
            raise ParamsError(f"train.erasing_aspect must be [min, max] height/width ratios, 0 < min <= max; got {[r0, r1]}")
        if v0 > v1:
            raise ParamsError(f"train.erasing_values must be [min, max] pixel values (0-255 scale), got {[v0, v1]}")
        self._check_recipe()

    def _check_recipe(self) -> None:
        if not 0 <= self.randaugment_ops <= 11:
            raise ParamsError(f"train.randaugment_ops must be 0 (off) to 11 (Keras' RandAugment has 11 operations), "
                              f"got {self.randaugment_ops}")
        if not 0.0 <= self.randaugment_magnitude <= 1.0:
            raise ParamsError(f"train.randaugment_magnitude must be between 0 and 1, got {self.randaugment_magnitude}")
        if self.mixup_alpha < 0:
            raise ParamsError(f"train.mixup_alpha must be >= 0 (0 = off), got {self.mixup_alpha}")
        if not 0.0 <= self.cutmix_alpha <= 1.0:
            raise ParamsError(f"train.cutmix_alpha must be between 0 (off) and 1 (Keras' CutMix takes no more), "
                              f"got {self.cutmix_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ParamsError(f"train.label_smoothing must be >= 0 and < 1, got {self.label_smoothing}")
        if self.weight_decay < 0 or (self.weight_decay and self.optimizer != "adamw"):
            raise ParamsError(f"train.weight_decay ({self.weight_decay}) must be >= 0 and needs train.optimizer: adamw "
                              "(Adam's L2 penalty is not decoupled weight decay)")
        if self.warmup_epochs < 0:
            raise ParamsError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_epochs and self.lr_schedule != "cosine":
            raise ParamsError(f"train.warmup_epochs ({self.warmup_epochs}; the default is 1.0) warms up the cosine "
                              f"schedule: with train.lr_schedule: {self.lr_schedule} set it to 0")
        if self.lr_schedule != "constant" and self.reduce_lr_patience:
            raise ParamsError("train.reduce_lr_patience lowers a constant learning rate on a plateau; "
                              f"with train.lr_schedule: {self.lr_schedule} set it to 0")
        if self.jit_compile and self.deterministic:
            raise ParamsError("train.jit_compile needs train.deterministic: false (Keras compiles nothing with XLA "
                              "while TensorFlow's op determinism is on)")
        if self.warm_start_epochs < 1:
            raise ParamsError(f"train.warm_start_epochs must be >= 1, got {self.warm_start_epochs} "
                              "(set train.warm_start: false to always train from nothing)")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ParamsError(f"train.ema_momentum must be >= 0 (0 = off) and < 1, got {self.ema_momentum}")


@dataclass(frozen=True)
class Evaluate:
    max_misclassified: int = 200
    min_accuracy: float = 0.0
    min_class_recall: float = 0.0
    max_accuracy_drop: float = 0.05
    gate_action: Literal["fail", "warn"] = "warn"
    blessed_file: str = "models/blessed.json"
    export_dir: str = "models/export"

    def check(self) -> None:
        if self.max_misclassified < 0:
            raise ParamsError("evaluate.max_misclassified must be >= 0")
        for name in ("min_accuracy", "min_class_recall", "max_accuracy_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamsError(f"evaluate.{name} must be between 0 and 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Params:
    base: Base = field(default_factory=Base)
    paths: Paths = field(default_factory=Paths)
    ingest: Ingest = field(default_factory=Ingest)
    runtime: Runtime = field(default_factory=Runtime)
    validate: Validate = field(default_factory=Validate)
    split: Split = field(default_factory=Split)
    preprocess: Preprocess = field(default_factory=Preprocess)
    rebalance: Rebalance = field(default_factory=Rebalance)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)


def _convert(key: str, value, tp):
    """Check `value` against the annotation `tp` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{key} must have {len(args)} items, got {list(value)}")
        return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is Literal:
        allowed = typing.get_args(tp)
        value = "none" if value is None else value  # YAML reads a bare `null` as None
        if value not in allowed:
            raise ParamsError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ParamsError(f"{key}: union types are not supported in params")
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return "none"
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be text, got {value!r}")
        return value
    raise ParamsError(f"{key}: unsupported type {tp}")


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix or 'params.yaml'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ParamsError(f"unknown key '{where}'{hint}; known keys: {', '.join(sorted(known))}")
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, data[f.name], key)
        else:
            values[f.name] = _convert(key, data[f.name], tp)
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def params_from_dict(data: dict) -> Params:
    """Build typed params from a parsed params.yaml; raises ParamsError naming the bad key."""
    return _build(Params, data, "")


# every knob of the pipeline, in the repository's root (DVC reads it there too)
PARAMS_FILE = "params.yaml"


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        return params_from_dict(data or {})
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
