"""Moved to :mod:`neuroblastoma_cnn.metrics` (core layer); this alias goes once no pipeline uses
it (pipelines must not import each other: import ``neuroblastoma_cnn.metrics`` instead)."""

from neuroblastoma_cnn.metrics import *  # noqa: F403
from neuroblastoma_cnn.metrics import _labels, _probabilities  # noqa: F401
from neuroblastoma_cnn.predictions import (  # noqa: F401
    PROB_PREFIX,
    aggregate_image_probabilities,
    class_names_of,
    probability_columns,
)
