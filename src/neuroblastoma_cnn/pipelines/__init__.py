"""Kedro pipelines of the project, one folder each; found by `find_pipelines`."""
