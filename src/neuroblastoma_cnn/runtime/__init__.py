"""How the process runs: devices, distribution strategy, mixed precision and resumable epochs
(``distribution``), worker pools (``parallel``), and environment defaults with the warning and
log filters installed before TensorFlow, Keras or MLflow load (``quiet``)."""
