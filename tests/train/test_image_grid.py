import numpy as np
import pytest
from PIL import Image

from mmjax.train import image_grid


def test_grid_places_each_image_under_its_caption(tmp_path):
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  images = np.broadcast_to(colours[:, None, None, :], (3, 16, 16, 3)).copy()
  path = tmp_path / "grid.png"
  grid = image_grid.save_grid(images, ["red", "green", "blue"], path, columns=2, scale=4)
  on_disk = np.asarray(Image.open(path))
  np.testing.assert_array_equal(grid, on_disk)
  assert on_disk.shape[1] == 2 * (64 + 4) + 4          # two columns of 64-px cells
  assert on_disk.shape[0] > 2 * (64 + 4)               # two rows plus caption space
  # The bottom-right pixel of each cell holds that image's colour.
  text_h = (grid.shape[0] - 4) // 2 - 64 - 4
  for i, colour in enumerate(colours):
    x = 4 + (i % 2) * 68 + 63
    y = 4 + (i // 2) * (64 + text_h + 4) + text_h + 63
    np.testing.assert_array_equal(on_disk[y, x], colour)
  # Caption rows contain dark text pixels.
  assert (on_disk[4:4 + text_h, 4:68] < 128).any()


def test_grid_rejects_mismatched_inputs(tmp_path):
  with pytest.raises(ValueError, match="captions"):
    image_grid.save_grid(np.zeros((2, 8, 8, 3), np.uint8), ["one"], tmp_path / "g.png")
  with pytest.raises(ValueError, match="uint8"):
    image_grid.save_grid(np.zeros((2, 8, 8, 3), np.float32), ["a", "b"], tmp_path / "g.png")
