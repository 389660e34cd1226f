"""Custom Kedro datasets of this project."""

from .champion_model import ChampionModelDataset, load_model_file
from .image_folder import ImageFolderDataset
from .keras_model import KerasModelDataset, load_keras_model, save_keras_model
from .mlflow_artifact import MlflowArtifactDataset
from .png_folder import GeoJsonFolderDataset, PngFolderDataset
from .remote_archive import RemoteArchiveDataset
from .tile_store import TileStore, TileStoreDataset, TileStream, write_tile_store
from .trained_models import ModelSelectionError, TrainedModels, TrainedModelsDataset

__all__ = [
    "ChampionModelDataset",
    "GeoJsonFolderDataset",
    "ImageFolderDataset",
    "KerasModelDataset",
    "MlflowArtifactDataset",
    "ModelSelectionError",
    "PngFolderDataset",
    "RemoteArchiveDataset",
    "TileStore",
    "TileStoreDataset",
    "TileStream",
    "TrainedModels",
    "TrainedModelsDataset",
    "load_keras_model",
    "load_model_file",
    "save_keras_model",
    "write_tile_store",
]
