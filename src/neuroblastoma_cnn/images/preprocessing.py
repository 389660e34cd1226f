"""The preprocessing record: how a model's training images became its inputs.

A model must never be applied with other settings than it was trained with, so every model
carries one typed record (class names in label order, the image checks, the tiling, the
architecture) and prediction reads tiling from it, never from the current parameters. The tile
store written by ingestion carries the same record without an architecture; training adds it.

The record is validated once, where a model is loaded (:func:`attach_preprocessing`): a model
whose record is missing, malformed, or does not fit the network (input size, number of outputs)
is refused there with a :class:`~neuroblastoma_cnn.core.errors.ModelError`. ``model.preprocessing``
is then a :class:`Preprocessing`.

Layouts: :meth:`Preprocessing.to_dict` writes each value once (``record_version: 2``).
:meth:`Preprocessing.from_dict` also reads the first layout (models saved before the record was
typed), where the tiling values were written twice, at the top level and under ``ingestion``.
A record without ``tiling.decoding`` (either layout) was written before reduced-scale decoding
existed and is read as ``full``: such a model predicts from full-resolution decodes, as trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from neuroblastoma_cnn.core.errors import ModelError
from neuroblastoma_cnn.images.decoding import (
    RESIZE_FILTER,
    SLIDE_TILING_FIELDS,
    ImageChecks,
    TilingConfig,
)

RECORD_VERSION = 2
#: What the first layout's code applied when a key was absent from its ``ingestion`` copy.
_LEGACY_DEFAULTS: dict[str, Any] = {
    "extensions": [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"],
    "max_image_pixels": 250_000_000,
    "min_image_size": 1,
    "tile_size": None,
    "stride": None,
    "min_tissue_fraction": 0.25,
    "input_size": 224,
    "tissue_min_saturation": 0.07,
    "tissue_white_level": 220,
    "decoding": "full",  # reduced-scale decoding came later
}
_LEGACY_SUMMARY = ("input_size", "tile_size", "stride", "min_tissue_fraction")


class Preprocessing(BaseModel):
    """Classes, image checks, tiling and architecture of a model (or of a tile store)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    classes: Annotated[tuple[str, ...], Strict(False), Field(min_length=1)]
    image_checks: ImageChecks
    tiling: TilingConfig
    #: None for a tile store: no model yet.
    architecture: str | None
    resize_filter: str = RESIZE_FILTER.name.lower()
    #: Optional extras a later stage may record (e.g. a stain-normalisation reference).
    stain_reference: dict[str, Any] | None = None
    #: Temperature fitted on the validation images (``evaluation.temperature_scaling``): every
    #: probability the model outputs is reported as ``softmax(log p / T)``; None = as output.
    #: Records written before calibration existed have none and read as None.
    temperature: Annotated[float, Field(gt=0.0)] | None = None
    #: Class-conditional conformal calibration (``analysis.conformal``): the coverage and each
    #: class's out-of-fold non-conformity scores, from which every answer gets its prediction
    #: set and ``refer`` flag; None = no sets (records before prediction sets read as None).
    conformal: dict[str, Any] | None = None

    @property
    def input_size(self) -> int:
        return self.tiling.input_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, each value once; what is written inside the model file. A record
        without a temperature is written as before temperatures existed (same bytes, so the
        hash a feature head keeps of its extractor's record is unchanged)."""
        values = self.model_dump(mode="json")
        for optional in ("temperature", "conformal"):
            if values[optional] is None:
                del values[optional]
        return {"record_version": RECORD_VERSION, **values}

    def with_temperature(self, temperature: float | None) -> Preprocessing:
        """The same record with ``temperature`` (None: none)."""
        return self.model_copy(update={"temperature": None if temperature is None
                                       else float(temperature)})

    def with_conformal(self, calibration: Mapping[str, Any] | None) -> Preprocessing:
        """The same record with a conformal calibration (None: none)."""
        return self.model_copy(update={"conformal": None if calibration is None
                                       else dict(calibration)})

    # ``dict(record)`` gives :meth:`to_dict`: code that stores a model's record as a plain
    # mapping (the ``.keras`` zip, MLflow metadata) keeps working with the typed record.
    def keys(self) -> Any:
        return self.to_dict().keys()

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> Preprocessing:
        """Reads either layout; raises :class:`ModelError` naming ``where`` if it is unusable."""
        data = dict(data or {})
        if not data.get("classes") or not (data.get("tiling") or data.get("ingestion")):
            raise ModelError(
                f"Model '{where}' carries no preprocessing record (classes and tiling), so it "
                "cannot be applied with the settings it was trained with.",
                hint="use a model saved by this project's training pipeline",
            )
        values = _from_legacy(data, where) if "tiling" not in data else data
        values.pop("record_version", None)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise ModelError(f"Model '{where}' has an invalid preprocessing record: {problems}."
                             ) from exc

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: str) -> Preprocessing:
        """The record inside a tile store's metadata (which also holds other keys)."""
        return cls.from_dict({k: v for k, v in metadata.items() if k in RECORD_KEYS}, where)

    @classmethod
    def from_store(cls, store: Any) -> Preprocessing:
        """The record a tile store's producer (ingestion) wrote into its metadata."""
        return cls.from_metadata(store.producer_metadata, f"tile store '{store.path}'")

    def check_model(self, model: Any, where: str) -> None:
        """Refuses a network whose input size or number of outputs the record contradicts."""
        input_shape = tuple(model.input_shape)
        size = self.tiling.input_size
        if input_shape[1:] != (size, size, 3):
            raise ModelError(f"Model '{where}' takes inputs {input_shape[1:]} but its record "
                             f"says {size}x{size} RGB tiles (input_size).")
        n_outputs = int(model.output_shape[-1])
        if n_outputs != len(self.classes):
            raise ModelError(f"Model '{where}' has {n_outputs} outputs but its record lists "
                             f"{len(self.classes)} classes {list(self.classes)}.")


def _from_legacy(data: dict[str, Any], where: str) -> dict[str, Any]:
    """First layout: ``ingestion`` holds the parameters, the top level a summary of them."""
    params = {**_LEGACY_DEFAULTS, **dict(data.get("ingestion") or {})}
    if isinstance(params["extensions"], str):
        params["extensions"] = [params["extensions"]]
    tiling = {k: params[k] for k in TilingConfig.model_fields if k not in SLIDE_TILING_FIELDS}
    stride = tiling["stride"] or tiling["tile_size"]
    summary = {**tiling, "stride": None if tiling["tile_size"] is None else stride}
    for key in _LEGACY_SUMMARY:
        if key in data and data[key] != summary[key]:
            raise ModelError(
                f"Model '{where}': its record says {key} = {data[key]!r} but its ingestion "
                f"parameters give {summary[key]!r}; the record is inconsistent."
            )
    return {
        "classes": [str(c) for c in data["classes"]],
        "image_checks": {k: params[k] for k in ImageChecks.model_fields},
        "tiling": tiling,
        "architecture": data.get("architecture"),
    }


def attach_preprocessing(model: Any, record: Mapping[str, Any] | Preprocessing | None,
                         where: str) -> Preprocessing:
    """Validates a loaded model's record against the model and attaches it as
    ``model.preprocessing``: the one check every loaded model goes through."""
    typed = record if isinstance(record, Preprocessing) else Preprocessing.from_dict(
        record or {}, where)
    typed.check_model(model, where)
    model.preprocessing = typed
    return typed


def preprocessing_of(model: Any) -> Preprocessing:
    """The typed record of a model loaded through :func:`attach_preprocessing` (or trained in
    this process); a model without one is refused."""
    record = getattr(model, "preprocessing", None)
    if isinstance(record, Preprocessing):
        return record
    where = str(getattr(model, "model_source", None) or getattr(model, "name", "model"))
    return attach_preprocessing(model, record, where)


#: Keys of a record in either layout, among the other keys of a tile store's metadata.
RECORD_KEYS = frozenset(Preprocessing.model_fields) | {"record_version", "ingestion"}
