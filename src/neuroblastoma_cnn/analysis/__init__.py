"""What a model's outputs mean: probability columns and image = mean of tiles
(``predictions``), temperature scaling and reliability (``calibration``), metrics with grouped
bootstrap intervals and figures (``metrics``), Grad-CAM maps (``gradcam``).

Named ``analysis`` rather than ``evaluation`` so that it is not confused with the
``pipelines/evaluation`` pipeline, which uses it (as do ``predict``, ``features`` and ``study``)."""
