"""Wires the splitting nodes: split, check for leakage before anything is saved, summarise."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from .nodes import check_no_leakage, split_tiles, summarise_split


def create_pipeline(**kwargs: Any) -> Pipeline:
    """`split_table_unchecked` stays in memory: only a table that passed the check is written."""
    return Pipeline(
        [
            Node(
                split_tiles,
                inputs=["tiles", "params:splitting"],
                outputs="split_table_unchecked",
                name="split_by_group",
            ),
            Node(
                check_no_leakage,
                inputs=["split_table_unchecked", "params:splitting"],
                outputs="split_table",
                name="check_no_leakage",
            ),
            Node(
                summarise_split,
                inputs=["split_table", "params:splitting"],
                outputs="split_summary",
                name="summarise_split",
            ),
        ],
        tags="data",
    )
