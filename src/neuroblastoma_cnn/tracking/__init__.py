"""Runs and what they leave: lineage records (``lineage``), the promotion of a model version
once its run finished (``promotion``), the removal of failed versions and runs (``prune``), what
may reach MLflow about patients (``privacy``) and the MLflow Model Registry (``registry``)."""
