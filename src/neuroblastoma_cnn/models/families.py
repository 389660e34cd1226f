"""The model families: which exist, what each can do, where its code is. One table, read by the
pipelines (which models train and cross-validate), the datasets (which names a trained model may
have), the command line, the served model and the promotion hook.

A *family* is a kind of model the project makes: the CNN architectures (a builder, trained by
their own ``train_<name>`` pipelines), the classical floor (colour and texture statistics + an
SVM, fitted inside evaluation and cross-validation), the scikit-learn heads on a CNN's
features and the fold ensemble (a cross-validation's K fold models as one Keras model). Each is
registered once, in :data:`FAMILIES`, with what it can do (:class:`Capability`) and, where it
cannot, why not.

Nothing here imports Keras or scikit-learn: a family names its builder by module and attribute,
imported when a model is built, so reading the table costs nothing (``--help``, error messages).

Adding a family: its module in ``models/``, one :class:`Family` below and its block of
parameters in ``conf/base/``; a trainable CNN also needs its parameter model in
``params/training.py`` (one per architecture: the YAML is typed before anything runs), which
``tests/models/test_families.py`` checks against this table.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from neuroblastoma_cnn.core.errors import ModelError, ParameterError


class Capability(str, Enum):
    """What the project can do with a family's models."""

    TRAIN = "train"                    # its own `train_<name>` pipeline (training + evaluation)
    CROSS_VALIDATE = "cross_validate"  # scored fold by fold by `cross_validate_<model>`
    PREDICT = "predict"                # classifies new images (`predict`, `neuroblastoma-cnn`)
    GRADCAM = "gradcam"                # Grad-CAM overlays of its decisions
    SERVE = "serve"                    # logged as the raw-image MLflow model and registered


@dataclass(frozen=True)
class Family:
    """One model family: its name, what it is, its builder and what it can do."""

    name: str
    kind: str  # "cnn", "classical", "hybrid", "feature_head" or "ensemble"
    summary: str
    module: str  # under neuroblastoma_cnn.models
    builder: str  # the attribute of ``module`` that builds (or fits) one
    can: frozenset[Capability]
    cannot: str = ""  # what it cannot do yet, and why
    keras: bool = False  # a Keras model: importing its module registers its custom layers
    cost: int = 0  # relative cost to train and serve: model selection's tie rule prefers lower

    def able(self, capability: Capability) -> bool:
        return capability in self.can

    def require(self, capability: Capability) -> None:
        """Raises :class:`ModelError` (one line, saying why) unless it can ``capability``."""
        if not self.able(capability):
            raise ModelError(f"Model family '{self.name}' ({self.summary}) cannot "
                             f"{capability.value.replace('_', '-')}: {self.cannot}")

    def load_builder(self) -> Callable[..., Any]:
        """The builder itself (imports the family's module: Keras or scikit-learn)."""
        module = importlib.import_module(f"{__package__}.{self.module}")
        return getattr(module, self.builder)


_CNN = frozenset(Capability)
#: A family fitted by `select_model` or inside evaluation (no pipeline of its own): scored on
#: folds, predicts and is served, no Grad-CAM of its own.
_FITTED = frozenset({Capability.CROSS_VALIDATE, Capability.PREDICT, Capability.SERVE})
FAMILIES: tuple[Family, ...] = (
    Family("resnet34", "cnn", "ResNet34 trained from scratch", "resnet34", "build_resnet34",
           _CNN, keras=True, cost=4),
    Family("resnet50", "cnn", "ResNet50, ImageNet backbone fine-tuned", "resnet50",
           "build_resnet50", _CNN, keras=True, cost=5),
    Family("floor", "classical", "colour and texture statistics + RBF SVM", "classical",
           "ColourTextureSVM", _FITTED, cost=1,
           cannot="it is trained inside evaluation and cross-validation, and saved only when "
                  "`select_model` chooses it; it has no convolutions for Grad-CAM"),
    Family("selected_floor", "classical",
           "colour/texture statistics; scale, feature groups and head (SVM, logistic "
           "regression, gradient boosting) chosen on grouped inner folds", "selected_floor",
           "SelectedFloor", _FITTED, cost=2,
           cannot="it is trained by `select_model` (no pipeline of its own) and has no "
                  "convolutions for Grad-CAM"),
    Family("hybrid", "hybrid",
           "a meta-learner (logistic regression, gradient boosting or a weighted mean) over "
           "out-of-fold probabilities of other families", "stacking", "StackedHybrid",
           _FITTED, cost=7,
           cannot="it is fitted by `select_model` on its bases' out-of-fold probabilities (no "
                  "pipeline of its own); Grad-CAM would show only its CNN base: predict with "
                  "that fold ensemble for it"),
    Family("feature_heads", "feature_head", "scikit-learn heads on a trained CNN's features",
           "feature_heads", "HeadClassifier", frozenset({Capability.PREDICT}), cost=3,
           cannot="heads are fitted by `<model>_features` on a trained CNN (not trained or "
                  "cross-validated on their own); Grad-CAM would show the CNN's classifier, not "
                  "the head's; the raw-image model serves Keras models only"),
    Family("cv_ensemble", "ensemble", "a cross-validation's fold models, averaged", "ensemble",
           "build_ensemble",
           frozenset({Capability.PREDICT, Capability.GRADCAM, Capability.SERVE}), cost=6,
           cannot="it is built from the fold models of `cross_validate_<model>`, not trained",
           keras=True),
)
_BY_NAME = {f.name: f for f in FAMILIES}
#: The ``kind`` of saved models that classify a whole image file at once (``predict_file``:
#: one answer a file, no tiles, no slides), served by ``serving.classical``.
WHOLE_IMAGE_KINDS = frozenset({"classical", "hybrid"})


def names(*capabilities: Capability, kind: str | None = None) -> list[str]:
    """The families that can do every one of ``capabilities`` (and are of ``kind``), in table
    order."""
    return [f.name for f in FAMILIES if all(f.able(c) for c in capabilities)
            and (kind is None or f.kind == kind)]


def family(name: str) -> Family:
    """The family called ``name`` (case and surrounding spaces ignored); a one-line
    :class:`ModelError` listing the known families otherwise."""
    key = str(name).strip().lower()
    if key not in _BY_NAME:
        raise ModelError(f"Unknown model family '{name}'. Known families: "
                         f"{', '.join(_BY_NAME)}.")
    return _BY_NAME[key]


def trainable() -> list[str]:
    """The models the training pipelines train, one ``train_<name>`` each."""
    return names(Capability.TRAIN)


def build_model(architecture: str, input_size: int, num_classes: int, **params: Any) -> Any:
    """Builds a trainable CNN (``architecture``: "resnet34", "resnet50") with its parameters
    from the config (an uncompiled Keras model).

    Unknown names or parameters fail with a message listing what is accepted, instead of a
    TypeError deep inside Keras.
    """
    name = str(architecture).strip().lower()
    if name not in trainable():
        raise ModelError(f"Unknown architecture '{architecture}'. Known architectures: "
                         f"{', '.join(trainable())}.")
    builder = family(name).load_builder()
    accepted = [p for p in inspect.signature(builder).parameters if p not in
                ("input_size", "num_classes")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ParameterError(
            f"Unknown parameter(s) {unknown} for architecture '{name}'. "
            f"Accepted: {', '.join(accepted)}."
        )
    return builder(input_size=input_size, num_classes=num_classes, **params)


def register_keras_layers() -> None:
    """Imports the module of every Keras family, which registers its custom layers
    (``WeightedMean``, ``ImagenetPreprocess``): call before loading a saved Keras model."""
    for f in FAMILIES:
        if f.keras:
            importlib.import_module(f"{__package__}.{f.module}")


def features_and_head(model: Any) -> tuple[Any, Any]:
    """(image -> pooled penultimate features, features -> probabilities) of any CNN built here,
    sharing its layers: the scikit-learn heads' input and ResNet50's cached-feature training.
    Each CNN family's module names its head layers (``HEAD``) and splits itself
    (``backbone_and_head``)."""
    present = {layer.name for layer in model.layers}
    modules = [importlib.import_module(f"{__package__}.{f.module}")
               for f in FAMILIES if f.kind == "cnn"]
    for module in modules:
        if module.HEAD.features in present:
            return module.backbone_and_head(model)
    known = ", ".join(f"'{m.HEAD.features}'" for m in modules)
    raise ModelError(
        f"Model '{model.name}' has no pooled-feature layer ({known}): it was not built by this "
        "project's CNN builders."
    )
