"""neuroblastoma-cnn: Kedro pipelines for CNN grading of H&E histology images."""

__version__ = "0.1.0"
