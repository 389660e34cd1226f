"""Grad-CAM on both architectures: heatmaps cover the image, lie in [0, 1] and follow the class.

Untrained models are enough: Grad-CAM is a property of the network's graph, not of its skill.
"""

from __future__ import annotations

import numpy as np
import pytest
from _params import params
from PIL import Image

from neuroblastoma_cnn.analysis.gradcam import GradCam, feature_tensor, image_gradcam, stitch
from neuroblastoma_cnn.images.decoding import TilingConfig
from neuroblastoma_cnn.models.families import build_model


def tiling(**overrides: object) -> TilingConfig:
    return TilingConfig.model_validate({**params("ingestion").tiling.model_dump(), **overrides})


@pytest.fixture(scope="module")
def tissue(bach_subset) -> np.ndarray:
    """A real 256x192 H&E image."""
    with Image.open(sorted(bach_subset.rglob("*.png"))[0]) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def resnet34():
    return build_model("resnet34", 64, 3, seed=1)


def test_heatmap_covers_the_image_in_unit_range_and_moves_with_the_class(resnet34, tissue):
    cam = GradCam(resnet34, batch_size=32)
    assert cam.layer_name == "conv5_block3_out"
    config = tiling(tile_size=96, stride=64, min_tissue_fraction=0.1, input_size=64)
    maps = [image_gradcam(cam, tissue, config, c, fallback_tiles=3) for c in range(3)]
    for heat, covered in maps:
        assert heat.shape == covered.shape == tissue.shape[:2]
        assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() == pytest.approx(1)
        assert not heat[~covered].any()
    assert maps[0][1].mean() > 0.5  # tissue nearly everywhere: most pixels under a tile
    heats = [h for h, _ in maps]
    for other in heats[1:]:  # each class has its own map: somewhere they differ clearly
        assert np.abs(heats[0] - other).max() > 0.3


def test_heatmap_of_a_scaled_overlay_has_the_scaled_shape(resnet34, tissue):
    config = tiling(tile_size=None, input_size=64)  # the whole image is one tile
    heat, covered = image_gradcam(GradCam(resnet34, batch_size=32), tissue, config, 0,
                                  fallback_tiles=3, scale=0.5)
    assert heat.shape == (96, 128) and covered.all()


def test_resnet50_nested_backbone_is_found():
    model = build_model("resnet50", 64, 2, weights=None, seed=0)
    name, tensor = feature_tensor(model)
    assert name == "resnet50" and tuple(tensor.shape[1:]) == (2, 2, 2048)
    tiles = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    maps = GradCam(model, batch_size=2).tile_maps(tiles, 1)
    assert maps.shape == (3, 2, 2) and (maps >= 0).all()


def test_stitch_averages_overlaps_and_leaves_gaps_cold():
    maps = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)]).astype(np.float32)
    heat, covered = stitch(maps, [(0, 0), (2, 0)], (4, 4), (5, 8))
    assert covered[:4, :6].all() and not covered[4].any() and not covered[:, 6:].any()
    np.testing.assert_allclose(heat[0, :2], 1 / 3)
    np.testing.assert_allclose(heat[0, 2:4], (1 + 3) / 2 / 3)
    np.testing.assert_allclose(heat[0, 4:6], 1.0)
