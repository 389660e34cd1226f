"""Custom Kedro datasets of this project."""

from .tile_store import TileStore, TileStoreDataset, TileStream, write_tile_store

__all__ = ["TileStore", "TileStoreDataset", "TileStream", "write_tile_store"]
