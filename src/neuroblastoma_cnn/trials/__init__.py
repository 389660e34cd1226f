"""The trials engine: many trainings of one model as resumable, parallel Optuna trials, and the
statistics that compare them. The study pipeline (variants x repeats) and the cross-validation
pipeline (one variant, a repeat per fold) both run on it; pipelines never import each other, so
it lives below them.

``plan`` (what the trials run), ``engine`` (the objective and the worker pool), ``storage``
(Optuna's RDB storage), ``studies`` (an Optuna study's records), ``child_runs`` (each trial's
MLflow child run), ``repeats`` (which patients validate in repeat r), ``trial`` (the project's
Keras trial: train, evaluate, log; the pipelines' own node functions handed in as
``ProjectSteps``), ``statistics`` (paired comparisons over repeats).
"""
