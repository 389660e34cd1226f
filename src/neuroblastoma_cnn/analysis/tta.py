"""Test-time augmentation: a model's probabilities averaged over the exact symmetries of a tile.

Here, not in ``images.online_augmentation`` (which draws the symmetries): the average is of the
model's *probabilities*, its record's temperature applied (``predictions.model_probabilities``),
which is what a model's outputs mean. Evaluation uses it on a ``tf.data`` dataset; prediction
averages the same symmetries batch by batch (``serving``); both name their columns with
:data:`TTA_PREFIX`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuroblastoma_cnn.analysis.predictions import model_probabilities
from neuroblastoma_cnn.images.online_augmentation import N_DIHEDRAL, dihedral

#: Prefix of the test-time-augmented columns (``tta_prob_<class>``, ``tta_predicted``...), beside
#: the plain ones (not ``prob_``: those stay the table's classes).
TTA_PREFIX = "tta_"


def tta_probabilities(model: Any, dataset: Any) -> np.ndarray:
    """Test-time augmentation: the model's class probabilities averaged over the eight exact
    symmetries of every image (four for non-square images).

    ``dataset`` yields image batches or ``(images, ...)`` tuples, float32 in [0, 255]; it is
    read once per symmetry, in order, so the rows match a plain ``model.predict(dataset)``.
    """
    import tensorflow as tf  # noqa: PLC0415  (lazy: TensorFlow only when predicting)

    spec = dataset.element_spec
    images = dataset.map(lambda *e: e[0]) if isinstance(spec, tuple) else dataset
    shape = images.element_spec.shape
    count = N_DIHEDRAL if shape[1] is not None and shape[1] == shape[2] else 4
    total: np.ndarray | None = None
    for k in range(count):
        variant = images.map(lambda x, k=k: dihedral(x, k), num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)
        prob = model_probabilities(model, model.predict(variant, verbose=0))
        total = prob if total is None else total + prob
    return total / count
