"""Custom Kedro datasets of this project."""

from .image_folder import ImageFolderDataset
from .keras_model import KerasModelDataset, load_keras_model, save_keras_model
from .mlflow_artifact import MlflowArtifactDataset
from .tile_store import TileStore, TileStoreDataset, TileStream, write_tile_store

__all__ = [
    "ImageFolderDataset",
    "KerasModelDataset",
    "MlflowArtifactDataset",
    "TileStore",
    "TileStoreDataset",
    "TileStream",
    "load_keras_model",
    "save_keras_model",
    "write_tile_store",
]
