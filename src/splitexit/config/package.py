"""The model package's spec (`model.yaml`) and the training settings that produce it."""

from __future__ import annotations

import math
from typing import Final, Literal

from pydantic import Field, field_validator, model_validator

from splitexit.config.base import SpecModel

PACKAGE_FORMAT: Final = "splitexit.package/1"
#: Threshold meaning "never exit here" (an uncalibrated exit).
NEVER = math.inf
DEFAULT_SPLIT_SEED = 0
DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
#: The side an image is resized and cropped to unless the folder spec says otherwise (ImageNet's).
IMAGE_SIZE = 224
MAX_IMAGE_SIZE = 4096
#: Class names a package may keep, and the length of each.
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200

class ExitPolicy(SpecModel):
    """How a calibrated net decides that a sample may leave at an early exit."""

    confidence: str = Field("max_softmax", description="max_softmax, entropy, margin, or a registered name")
    temperatures: tuple[float, ...] = Field(description="one per exit, the final exit included")
    thresholds: tuple[float, ...] = Field(description="one per early exit; leave when confidence >= threshold")

    @model_validator(mode="after")
    def _lengths_agree(self) -> ExitPolicy:
        if len(self.temperatures) != len(self.thresholds) + 1:
            raise ValueError(f"{len(self.thresholds)} early-exit thresholds need {len(self.thresholds) + 1} "
                             f"temperatures (the final exit has one too), got {len(self.temperatures)}")
        if any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ValueError("temperatures must be positive finite numbers")
        if any(math.isnan(t) for t in self.thresholds):
            raise ValueError("thresholds must be numbers (use .inf for 'never exit here')")
        return self

    @classmethod
    def uncalibrated(cls, early_exits: int, confidence: str = "max_softmax") -> ExitPolicy:
        """Every sample runs to the final exit until `calibrate` sets thresholds."""
        return cls(confidence=confidence, temperatures=(1.0,) * (early_exits + 1), thresholds=(NEVER,) * early_exits)


class ModelSource(SpecModel):
    """Where the backbone comes from: a zoo name, a torchvision name, or `module:factory` / `file.py:factory`."""

    name: str
    num_classes: int | None = Field(None, ge=2)


class InputSpec(SpecModel):
    """One sample as the model takes it (no batch dimension)."""

    shape: tuple[int, ...]
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input shape must be non-empty and positive, got {shape}")
        return shape


class ExitSpec(SpecModel):
    """One early exit: where it sits and which head it carries."""

    cut: int = Field(ge=0, description="cut id from `splitexit cuts`")
    after: str = Field(description="fx node just before the cut; checked on load against the traced model")
    head: str = Field("auto", description="head builder name")


class DataSplit(SpecModel):
    """How a dataset was split into disjoint train / calibration / test parts."""

    dataset: str
    seed: int = DEFAULT_SPLIT_SEED
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
        return fractions


class CpuSettings(SpecModel):
    """The memory format and thread count that measured fastest for this model on the CPU."""

    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    threads: int | None = Field(None, ge=1, description="None: leave torch's default")


class TrainConfig(SpecModel):
    """How exits (and optionally the backbone) are trained."""

    mode: Literal["heads", "joint"] = Field("joint", description="heads: backbone frozen; joint: everything")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    exit_weights: tuple[float, ...] | None = Field(None, description="loss weight per exit; None: all 1.0")
    distill: float = Field(0.0, ge=0, description="weight of distillation from the final exit (0: off)")
    distill_temperature: float = Field(3.0, gt=0)
    seed: int = Field(0, description="seeds the initial weights and the batch order")
    patience: int | None = Field(None, ge=1, description="stop once the exits' mean validation accuracy has not "
                                                         "improved for this many epochs, keeping the best epoch's "
                                                         "weights; None: run every epoch")


class ImageInput(SpecModel):
    """How an image file becomes the model's input (``folder:PATH?size=..``), kept so that eval, run and
    infer prepare images exactly as training did."""

    size: int = Field(IMAGE_SIZE, ge=1, le=MAX_IMAGE_SIZE, description="shorter side resized to this, then a "
                                                                       "centre crop of size x size")
    channels: Literal[1, 3] = Field(3, description="3: RGB, 1: greyscale")
    normalize: Literal["imagenet", "none"] = Field("imagenet", description="imagenet: ImageNet mean and std per "
                                                                           "channel; none: values in [0, 1]")


class PackageSpec(SpecModel):
    """The contents of a package's model.yaml."""

    format: Literal["splitexit.package/1"] = PACKAGE_FORMAT
    model: ModelSource
    input: InputSpec
    exits: tuple[ExitSpec, ...]
    policy: ExitPolicy
    cpu: CpuSettings = CpuSettings()
    data: DataSplit | None = None
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training: dict[str, float | int | str | None] = Field(default_factory=dict)
    calibration: dict[str, float | int | str | None] = Field(default_factory=dict)
    images: ImageInput | None = Field(None, description="how image files are prepared, for image-trained models")
    classes: tuple[str, ...] | None = Field(None, max_length=MAX_CLASSES,
                                            description="class names, index order (from the dataset)")

    @field_validator("classes")
    @classmethod
    def _short_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is not None and any(len(n) > MAX_CLASS_NAME for n in names):
            raise ValueError(f"class names are at most {MAX_CLASS_NAME} characters")
        return names

    @model_validator(mode="after")
    def _policy_matches_exits(self) -> PackageSpec:
        if len(self.policy.thresholds) != len(self.exits):
            raise ValueError(f"policy has {len(self.policy.thresholds)} thresholds for {len(self.exits)} exits")
        cuts = [e.cut for e in self.exits]
        if cuts != sorted(set(cuts)):
            raise ValueError(f"exit cuts must be distinct and increasing, got {cuts}")
        return self


MANIFEST_FORMAT: Final = "splitexit.manifest/1"
_SHA256 = r"^[0-9a-f]{64}$"


class CodeDigest(SpecModel):
    """The user's source file a package's backbone was built from, as it was when the package was written."""

    file: str = Field(description="the file hashed: the .py file, or the module's file (absolute)")
    sha256: str = Field(pattern=_SHA256)


class PackageManifest(SpecModel):
    """The contents of a package's manifest.json: what the package was written from.

    ``model.yaml`` records the weights' sha256; the manifest records model.yaml's, and the code's for a backbone
    from the user's own code, so neither the spec nor the code can change unnoticed.
    """

    format: Literal["splitexit.manifest/1"] = MANIFEST_FORMAT
    spec_sha256: str = Field(pattern=_SHA256, description="sha256 of model.yaml")
    code: CodeDigest | None = Field(None, description="set when the backbone is `module:factory` / `file.py:factory`")
