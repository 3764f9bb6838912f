"""PNG grids of images with a caption above each cell (or each row), for previews and samples."""

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font():
  return ImageFont.load_default()


def save_grid(images, captions, path, columns=8, scale=None, caption_lines=4):
  """Writes uint8 images [N,H,W,3] as a grid with each image's caption above it.

  `scale` enlarges small images (nearest neighbour) so captions stay legible; by default
  cells are at least 128 px wide. Returns the grid as a uint8 array.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
  if len(captions) != len(images):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  n, h, w, _ = images.shape
  scale = scale or max(1, -(-128 // w))
  cell_w, cell_h = w * scale, h * scale
  font = _font()
  line_h = font.getbbox("Ay")[3] + 2
  text_h = caption_lines * line_h + 4
  columns = min(columns, n)
  rows = -(-n // columns)
  grid = Image.new("RGB", (columns * (cell_w + 4) + 4, rows * (cell_h + text_h + 4) + 4), "white")
  draw = ImageDraw.Draw(grid)
  chars_per_line = max(8, cell_w // max(1, font.getbbox("x")[2]))
  for i, (image, caption) in enumerate(zip(images, captions)):
    x = 4 + (i % columns) * (cell_w + 4)
    y = 4 + (i // columns) * (cell_h + text_h + 4)
    lines = textwrap.wrap(str(caption), chars_per_line)[:caption_lines]
    for k, line in enumerate(lines):
      draw.text((x, y + k * line_h), line, fill="black", font=font)
    cell = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
    grid.paste(cell, (x, y + text_h))
  grid.save(path)
  return np.asarray(grid)
