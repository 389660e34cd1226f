"""A streamable, versioned store of image tiles: ``.npy`` shards plus one index table.

Why this format: tiles are stored already resized to the model's input size as uint8 arrays in
shards of a bounded number of tiles, so writing keeps at most one shard in memory, reading can
memory-map any shard, and a ``tf.data`` pipeline can pull a subset without decoding images again.
The index (``index.csv``) holds one row per tile with its position in the shards and whatever
metadata the producer attached (source image, class, group, coordinates...).

Layout of one store folder::

    store.json      # {"format": "tile-store", "tile_shape": [H, W, 3], "count": N, ...}
    index.csv       # tile_id, shard, offset, <metadata columns>
    shard-00000.npy # uint8 array [n, H, W, 3]
    shard-00001.npy
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io.core import DatasetError, Version

from neuroblastoma_cnn.core.storage import FsPath, as_path, is_local

from .local_versioned import LocalVersionedDataset

logger = logging.getLogger(__name__)

STORE_FORMAT = "tile-store"
STORE_VERSION = 1
INDEX_FILE = "index.csv"
META_FILE = "store.json"
RESERVED_COLUMNS = ("tile_id", "shard", "offset")
# Fields write_tile_store puts in store.json itself; everything else came from the producer.
STORE_FIELDS = ("format", "version", "tile_shape", "count", "shards")
# Names like "001" (patients) or "1" (classes) must not come back as numbers.
STRING_COLUMNS = {"image_path": str, "label": str, "group": str, "slide_path": str,
                  "region": str}

TileRecord = tuple[np.ndarray, Mapping[str, Any]]


class TileStream:
    """A lazy iterable of ``(tile, metadata)`` pairs plus store-level metadata.

    Nodes return one of these instead of arrays so that the dataset writes tiles as they are
    produced: memory stays bounded by one shard however large the data set grows.
    ``records`` is a zero-argument callable so the stream can be iterated more than once.
    """

    def __init__(self, records: Any, metadata: Mapping[str, Any] | None = None):
        if not callable(records):
            raise TypeError("TileStream needs a zero-argument callable that yields records")
        self._records = records
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __iter__(self) -> Iterator[TileRecord]:
        return iter(self._records())


class TileStore:
    """Read access to a written store; loading it reads only the index, never the pixels."""

    def __init__(self, path: str | Path | FsPath):
        self.path = as_path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise DatasetError(
                f"'{self.path}' is not a tile store: '{META_FILE}' is missing. "
                "Run the pipeline that writes it (e.g. 'kedro run --pipeline=ingestion') first."
            )
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        if self.metadata.get("format") != STORE_FORMAT:
            raise DatasetError(f"'{meta_path}' does not describe a {STORE_FORMAT}.")
        with (self.path / INDEX_FILE).open("r") as index:
            self.index: pd.DataFrame = pd.read_csv(
                index, keep_default_na=False, dtype=STRING_COLUMNS
            )
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"TileStore(path='{self.path}', tiles={len(self)}, shape={self.tile_shape})"

    @property
    def producer_metadata(self) -> dict[str, Any]:
        """The metadata its producer attached (classes, preprocessing...), without bookkeeping."""
        return {k: v for k, v in self.metadata.items() if k not in STORE_FIELDS}

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["tile_shape"])

    def _shard(self, shard: int) -> np.ndarray:
        """Local shards are memory-mapped; a remote shard is downloaded once, when first read."""
        if shard not in self._shards:
            path = self.path / _shard_name(shard)
            if is_local(path):
                self._shards[shard] = np.load(path, mmap_mode="r")
            else:
                self._shards[shard] = np.load(io.BytesIO(path.read_bytes()))
        return self._shards[shard]

    def get(self, tile_ids: Iterable[int] | None = None) -> np.ndarray:
        """Loads the given tiles (all when None) into memory, in the order asked for."""
        rows = self.index if tile_ids is None else self.rows(tile_ids)
        out = np.empty((len(rows), *self.tile_shape), dtype=np.uint8)
        for i, (shard, offset) in enumerate(zip(rows["shard"], rows["offset"], strict=True)):
            out[i] = self._shard(int(shard))[int(offset)]
        return out

    def rows(self, tile_ids: Iterable[int]) -> pd.DataFrame:
        """Index rows for the given tile ids, in that order; unknown ids raise a clear error."""
        ids = list(tile_ids)
        by_id = self.index.set_index("tile_id", drop=False)
        missing = sorted(set(ids) - set(by_id.index))
        if missing:
            raise KeyError(f"Tile ids not in store '{self.path}': {missing[:10]}")
        return by_id.loc[ids].reset_index(drop=True)

    def iter_batches(
        self, tile_ids: Iterable[int] | None = None, batch_size: int = 256
    ) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """Yields ``(index rows, uint8 tiles)`` in batches, so callers never hold all pixels."""
        rows = self.index if tile_ids is None else self.rows(tile_ids)
        for start in range(0, len(rows), batch_size):
            chunk = rows.iloc[start : start + batch_size]
            yield chunk.reset_index(drop=True), self.get(chunk["tile_id"])


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def _checked_tile(raw_tile: Any, meta: Mapping[str, Any],
                  tile_shape: tuple[int, ...] | None) -> np.ndarray:
    """The tile as an array, once it is uint8 [H, W, C] of the store's shape (``tile_shape``,
    None for the first tile) and its metadata uses no reserved column."""
    tile = np.asarray(raw_tile)
    if tile.dtype != np.uint8 or tile.ndim != 3:
        raise DatasetError(
            f"Tiles must be uint8 arrays [H, W, C]; got {tile.dtype} {tile.shape}."
        )
    if tile_shape is not None and tile.shape != tile_shape:
        raise DatasetError(
            f"All tiles in a store must share one shape: {tile.shape} after {tile_shape}."
        )
    bad = set(meta) & set(RESERVED_COLUMNS)
    if bad:
        raise DatasetError(f"Tile metadata may not use reserved columns {sorted(bad)}.")
    return tile


def write_tile_store(
    path: str | Path,
    records: Iterable[TileRecord],
    metadata: Mapping[str, Any] | None = None,
    shard_size: int = 512,
) -> TileStore:
    """Writes records into a new store folder; refuses to overwrite an existing one.

    The store is written to a temporary sibling folder and renamed at the end, so a failure
    never leaves a half-written store that later stages could mistake for a complete one.
    """
    path = as_path(path)
    if path.exists():
        raise DatasetError(f"Refusing to overwrite existing tile store '{path}'.")
    if not is_local(path):
        return _write_remote(path, records, metadata, shard_size)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    buffer: list[np.ndarray] = []
    shard = 0
    tile_shape: tuple[int, ...] | None = None

    def flush() -> None:
        nonlocal shard
        if buffer:
            np.save(tmp / _shard_name(shard), np.stack(buffer))
            buffer.clear()
            shard += 1

    try:
        for raw_tile, meta in records:
            tile = _checked_tile(raw_tile, meta, tile_shape)
            tile_shape = tile.shape
            rows.append({"tile_id": len(rows), "shard": shard, "offset": len(buffer), **meta})
            buffer.append(tile)
            if len(buffer) >= shard_size:
                flush()
        flush()
        index = pd.DataFrame(rows, columns=None if rows else list(RESERVED_COLUMNS))
        index.to_csv(tmp / INDEX_FILE, index=False)
        meta_out = _store_metadata(metadata, tile_shape, len(rows), shard)
        (tmp / META_FILE).write_text(json.dumps(meta_out, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(path)
    logger.info("Wrote %d tiles in %d shard(s) to '%s'", len(rows), shard, path)
    return TileStore(path)


def _store_metadata(metadata: Mapping[str, Any] | None, tile_shape: tuple[int, ...] | None,
                    count: int, shards: int) -> dict[str, Any]:
    """The store's ``metadata.json``: the caller's metadata plus format, version and sizes."""
    return {
        **dict(metadata or {}),
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "tile_shape": list(tile_shape) if tile_shape else None,
        "count": count,
        "shards": shards,
    }


def _write_remote(path: FsPath, records: Iterable[TileRecord],
                  metadata: Mapping[str, Any] | None, shard_size: int) -> TileStore:
    """Object stores have no rename: the store is written to a local temporary folder, its
    shards and index uploaded, and ``store.json`` (what marks a store complete) uploaded last."""
    with tempfile.TemporaryDirectory(prefix="tile-store-") as tmp:
        local = write_tile_store(Path(tmp) / "store", records, metadata, shard_size).path
        files = sorted(p.name for p in local.iterdir())
        for name in [f for f in files if f != META_FILE] + [META_FILE]:
            path.fs.put_file(str(local / name), (path / name).path)
    path.invalidate()
    logger.info("Uploaded the tile store to '%s'", path)
    return TileStore(path)


class TileStoreDataset(LocalVersionedDataset):
    """Kedro dataset for a tile store folder; versioned like any file dataset.

    ``save`` takes a :class:`TileStream` (or any iterable of ``(tile, metadata)``, or an existing
    :class:`TileStore` to copy) and streams it to disk; ``load`` returns a :class:`TileStore`
    that reads pixels only on demand.
    """

    def __init__(
        self,
        filepath: str,
        shard_size: int = 512,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ):
        self._shard_size = shard_size
        super().__init__(filepath, version, metadata, credentials, fs_args)

    def _is_complete(self, path: str) -> bool:
        # written last: a store without it is partial
        return bool(self._fs.exists(posixpath.join(path, META_FILE)))

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "shard_size": self._shard_size}

    def load(self) -> TileStore:
        return TileStore(self._load_path())

    def save(self, data: TileStream | TileStore | Iterable[TileRecord]) -> None:
        path = self._save_path()
        if self.is_local:
            path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, TileStore):
            records: Iterable[TileRecord] = _copy_records(data)
            metadata = data.producer_metadata
        else:
            records = data
            metadata = getattr(data, "metadata", {})
        # A producer may ask for its shard size (e.g. the `ingestion.shard_size` parameter).
        shard_size = int(metadata.get("shard_size") or self._shard_size)
        write_tile_store(path, records, metadata, shard_size)
        self._invalidate_cache()


def _copy_records(store: TileStore) -> Iterator[TileRecord]:
    for rows, tiles in store.iter_batches():
        meta_cols = [c for c in rows.columns if c not in RESERVED_COLUMNS]
        yield from zip(tiles, rows[meta_cols].to_dict("records"), strict=True)
