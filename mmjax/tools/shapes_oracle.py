"""Reads a shapes image back into attributes, to score generated images against their prompts.

  scene = describe(image)                      # objects (colour, shape, size, x, y) + relation
  scores = score(image, "a red circle above a small blue square")
  scores = score(image, example)               # a stored dataset example (tfds.as_numpy)

It is meant for noisy, blurry, slightly off-colour images (dVAE reconstructions, samples):
  1. contrast = largest channel difference from the background colour (the image's median), so
     a tinted or grey background works too; foreground = contrast above a low threshold,
     split into 8-connected components;
  2. each component is re-thresholded at half its own peak contrast (the edge of a blurred
     shape sits near half its contrast), which also cuts faint bridges between objects;
     pieces too small to be an object are counted as specks and ignored;
  3. colour: mean of the object's bright core less the background colour, normalised by its
     brightest channel (a dimmed white is still white), nearest palette colour;
  4. shape and size: least-squares fit of the object's contrast (scaled to [0, 1]) to every
     shape's mask -- the masks the dataset is drawn with -- at sides near the observed one,
     each also blurred at a few widths, shifted up to 2 px; the best fit names shape and side.
Images of 128 px and more are block-averaged to 64..127 px first.

Self-check on fresh renders, clean and degraded:
  python -m mmjax.tools.shapes_oracle --image_size=64 --num_images=2000
"""

import dataclasses
import functools
import io
import itertools
from typing import Iterable, Mapping

from absl import app, flags, logging
import numpy as np
from PIL import Image
from scipy import ndimage
from threadpoolctl import ThreadpoolController

from mmjax.errors import DataError
from mmjax.input_pipeline import shapes_render
# Re-exported: callers score prompts with parse_caption and build expected Scenes.
from mmjax.input_pipeline.shapes_render import Scene, SceneObject, parse_caption  # noqa: F401

_PALETTE = np.array([shapes_render.COLOURS[c] for c in shapes_render.COLOUR_NAMES], np.float32)
_PALETTE_UNIT = _PALETTE / _PALETTE.max(axis=1, keepdims=True)
_EIGHT_CONNECTED = np.ones((3, 3), bool)
# Size boundary halfway (geometrically) between the small and large sides.
_SIZE_BOUNDARY = float(np.sqrt(np.prod(list(shapes_render.SIZE_FRACTIONS.values()))))
# Larger images are block-averaged down to this size or a bit above before detection.
_WORKING_SIZE = 64
# Most components considered when matching expected objects (the largest ones).
_MAX_CANDIDATES = 6


@dataclasses.dataclass(frozen=True)
class OracleSettings:
  min_contrast: float = 48.0        # foreground floor on the contrast (0..255)
  relative_contrast: float = 0.3    # ... or this fraction of the image's highest contrast
  edge_fraction: float = 0.5        # per-object threshold: this fraction of its peak
  core_fraction: float = 0.75       # pixels this bright (of the peak) decide the colour
  min_area_fraction: float = 0.25   # smaller pieces, relative to the smallest object's area,
                                    # are specks


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  colour: str = "red"
  shape: str = "circle"
  size: str = "large"
  x: int = 0                    # centre, pixels
  y: int = 0
  side: int = 0                 # side of the best-matching mask, pixels
  area: int = 0                 # pixels in the object's mask
  shape_fit: float = 0.0        # 1 - residual / energy of the best template (1 when clean)
  colour_distance: float = 0.0  # distance of the normalised colour to the palette (0..sqrt(3))

  def as_scene_object(self) -> SceneObject:
    return SceneObject(colour=self.colour, shape=self.shape, size=self.size, x=self.x, y=self.y)


@dataclasses.dataclass(frozen=True)
class Detection:
  objects: tuple[DetectedObject, ...] = ()   # left to right, then top to bottom
  num_specks: int = 0                        # components ignored as too small

  @property
  def scene(self) -> Scene:
    relation = "none"
    if len(self.objects) == 2:
      relation = shapes_render.relation_between(*(o.as_scene_object() for o in self.objects))
    return Scene(objects=tuple(o.as_scene_object() for o in self.objects), relation=relation)


def _as_rgb(image) -> np.ndarray:
  """uint8 or float ([0, 1]) [H, W, 3] -> float32 0..255."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise DataError(f"shapes oracle expects a square RGB image [H, H, 3], got {image.shape}")
  if image.dtype == np.uint8:
    return image.astype(np.float32)
  if np.issubdtype(image.dtype, np.floating):
    return np.clip(image.astype(np.float32), 0, 1) * 255
  raise DataError(f"shapes oracle expects uint8 or float [0, 1] pixels, got {image.dtype}")


def _classify_colour(pixels: np.ndarray, background: np.ndarray) -> tuple[str, float]:
  """Nearest palette colour to the mean of `pixels` [N, 3] less `background` [3], compared at
  unit brightness."""
  mean = np.maximum(pixels.mean(axis=0) - background, 0)
  unit = mean / max(float(mean.max()), 1e-6)
  distances = np.linalg.norm(_PALETTE_UNIT - unit, axis=1)
  best = int(distances.argmin())
  return shapes_render.COLOUR_NAMES[best], float(distances[best])


_TEMPLATE_PAD = 2                       # room for a blurred template's halo
_TEMPLATE_BLURS = (0.0, 0.6, 1.0, 1.5)  # Gaussian sigmas (pixels) the templates are tried at


@functools.lru_cache(maxsize=None)
def _template_bank(side: int) -> tuple[np.ndarray, np.ndarray]:
  """Every shape's mask at `side`, padded and blurred at each of _TEMPLATE_BLURS.

  Returns templates as columns [t * t, len(SHAPES) * len(_TEMPLATE_BLURS)] (t = side + 2 * pad,
  shape-major order) and their energies (sums of squares).
  """
  size = side + 2 * _TEMPLATE_PAD
  rows = []
  for shape in shapes_render.SHAPES:
    padded = np.zeros((size, size), np.float32)
    padded[_TEMPLATE_PAD:-_TEMPLATE_PAD, _TEMPLATE_PAD:-_TEMPLATE_PAD] = (
        shapes_render.shape_mask(shape, side))
    for sigma in _TEMPLATE_BLURS:
      rows.append(ndimage.gaussian_filter(padded, sigma) if sigma else padded)
  bank = np.stack(rows).reshape(len(rows), size * size)
  columns, energies = np.ascontiguousarray(bank.T), (bank * bank).sum(axis=1)
  columns.setflags(write=False)
  energies.setflags(write=False)
  return columns, energies


def _match_shape(soft: np.ndarray, box: tuple[int, int, int, int]
                 ) -> tuple[str, int, float, tuple[int, int]]:
  """Least-squares fit of every shape template to `soft` (object contrast in [0, 1] on a
  canvas with a margin around it). `box` = (top, left, height, width) of the thresholded mask
  on the canvas; sides near its extent are tried, shifted up to 2 px from its centre.

  Returns (shape, side, fit, (top, left)): fit = 1 - residual / template energy (1 for a clean
  render), (top, left) = the drawn mask's corner on the canvas.
  """
  top, left, height, width = box
  extent = max(height, width)
  canvas_energy = float((soft * soft).sum())
  best = ("square", extent, -np.inf, (top, left))
  for side in range(max(3, extent - 2), extent + 4):
    size = side + 2 * _TEMPLATE_PAD
    # Padded-template corners 2 px either side of the one that centres it on the box.
    row0 = max(0, top + (height - side) // 2 - _TEMPLATE_PAD - 2)
    col0 = max(0, left + (width - side) // 2 - _TEMPLATE_PAD - 2)
    region = soft[row0:row0 + size + 4, col0:col0 + size + 4]
    if min(region.shape) < size:
      continue
    bank, energies = _template_bank(side)
    windows = np.lib.stride_tricks.sliding_window_view(region, (size, size))
    positions = windows.shape[:2]
    # Residual over the whole canvas = canvas energy - 2 <window, template> + template energy.
    gains = 2 * windows.reshape(-1, size * size) @ bank - energies
    position, template = np.unravel_index(int(gains.argmax()), gains.shape)
    fit = 1 - (canvas_energy - float(gains[position, template])) / float(energies[template])
    if fit > best[2]:
      row, col = np.unravel_index(position, positions)
      best = (shapes_render.SHAPES[template // len(_TEMPLATE_BLURS)], side, fit,
              (row0 + int(row) + _TEMPLATE_PAD, col0 + int(col) + _TEMPLATE_PAD))
  return best


def _pieces(contrast: np.ndarray, settings: OracleSettings) -> list[tuple[int, int, np.ndarray]]:
  """(top, left, mask) of each bright piece: components above a low threshold, each cut at
  `edge_fraction` of its own peak (a blurred edge sits near half the peak; faint bridges
  between neighbours fall below it)."""
  threshold = max(settings.min_contrast, settings.relative_contrast * float(contrast.max()))
  labels, _ = ndimage.label(contrast >= threshold, structure=_EIGHT_CONNECTED)
  pieces = []
  for index, box in enumerate(ndimage.find_objects(labels), start=1):
    if box is None:
      continue
    region_contrast = np.where(labels[box] == index, contrast[box], 0)
    peak = float(np.percentile(region_contrast[region_contrast > 0], 90))
    parts, _ = ndimage.label(region_contrast >= settings.edge_fraction * peak,
                             structure=_EIGHT_CONNECTED)
    for part_index, part_box in enumerate(ndimage.find_objects(parts), start=1):
      if part_box is not None:
        pieces.append((box[0].start + part_box[0].start, box[1].start + part_box[1].start,
                       parts[part_box] == part_index))
  return pieces


def _downsample(rgb: np.ndarray) -> tuple[np.ndarray, int]:
  """Block-averages images of 128 px and more to 64..127 px: the fit's cost grows with the
  object's area, and objects stay 16+ px wide there."""
  factor = rgb.shape[0] // _WORKING_SIZE
  if factor < 2 or rgb.shape[0] % factor:
    return rgb, 1
  size = rgb.shape[0] // factor
  return rgb.reshape(size, factor, size, factor, 3).mean(axis=(1, 3)), factor


@functools.cache
def _blas_controller() -> ThreadpoolController:
  return ThreadpoolController()


def detect(image, settings: OracleSettings = OracleSettings()) -> Detection:
  """Objects found in a shapes image (uint8 or float [0, 1], [H, H, 3])."""
  # The template fits are many tiny matrix products: a multi-threaded BLAS spends far longer
  # waking threads than multiplying (10x slower on a busy 2-core machine).
  with _blas_controller().limit(limits=1, user_api="blas"):
    return _detect(image, settings)


def _detect(image, settings: OracleSettings) -> Detection:
  rgb, factor = _downsample(_as_rgb(image))
  image_size = rgb.shape[0]
  background = np.median(rgb.reshape(-1, 3), axis=0)
  contrast = np.abs(rgb - background).max(axis=2)
  smallest_side = shapes_render.side_px("small", image_size)
  min_area = max(3.0, settings.min_area_fraction * 0.4 * smallest_side ** 2)  # ~ a small star
  pieces = _pieces(contrast, settings)
  kept = [(top, left, mask) for top, left, mask in pieces if mask.sum() >= min_area]
  num_specks = len(pieces) - len(kept)
  # Which kept piece owns each pixel, so a neighbour's pixels never enter an object's fit.
  owner = np.zeros(contrast.shape, np.int32)
  for number, (top, left, mask) in enumerate(kept, start=1):
    owner[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = number
  neighbours_halo = ndimage.grey_dilation(owner, size=(3, 3))
  margin = _TEMPLATE_PAD + 5
  padded_contrast = np.pad(contrast, margin)
  padded_owner = np.pad(np.maximum(owner, neighbours_halo * (owner == 0)), margin)
  objects = []
  for number, (top, left, mask) in enumerate(kept, start=1):
    height, width = mask.shape
    crop_contrast = contrast[top:top + height, left:left + width]
    peak = float(np.percentile(crop_contrast[mask], 90))
    window = (slice(top, top + height + 2 * margin), slice(left, left + width + 2 * margin))
    soft = np.clip(padded_contrast[window] / max(peak, 1.0), 0, 1)
    foreign = (padded_owner[window] != 0) & (padded_owner[window] != number)
    soft = np.where(foreign, 0, soft).astype(np.float32)
    shape, side, fit, (y0, x0) = _match_shape(soft, (margin, margin, height, width))
    core = mask & (crop_contrast >= settings.core_fraction * crop_contrast[mask].max())
    colour, distance = _classify_colour(rgb[top:top + height, left:left + width][core],
                                        background)
    objects.append(DetectedObject(
        colour=colour, shape=shape,
        size="large" if side / image_size >= _SIZE_BOUNDARY else "small",
        x=factor * (left - margin + x0 + side // 2), y=factor * (top - margin + y0 + side // 2),
        side=factor * side, area=factor * factor * int(mask.sum()), shape_fit=round(fit, 4),
        colour_distance=round(distance, 4)))
  if num_specks:
    logging.debug("shapes oracle: ignored %d specks", num_specks)
  objects.sort(key=lambda o: (o.x, o.y))
  return Detection(objects=tuple(objects), num_specks=num_specks)


def describe(image, settings: OracleSettings = OracleSettings()) -> Scene:
  """The scene an image shows: objects left to right and, for two, objects[0]'s relation."""
  return detect(image, settings).scene


def _expected_scene(attributes) -> Scene:
  if isinstance(attributes, Scene):
    return attributes
  if isinstance(attributes, str):
    return parse_caption(attributes)
  if isinstance(attributes, Mapping):
    return shapes_render.scene_from_example(attributes)
  raise DataError(f"attributes must be a Scene, a caption or a dataset example, got "
                  f"{type(attributes).__name__}")


def score(image, attributes, settings: OracleSettings = OracleSettings()) -> dict:
  """Whether the image shows what `attributes` (Scene, caption or stored example) says.

  Expected objects are matched to detected ones (the assignment agreeing on most attributes).
  Returns bools: count (as many objects as expected), colour, shape, size (None when the
  attributes name no size), relation (for one object: no second object), and all of them.
  """
  return compare(detect(image, settings), attributes)


def compare(detection: Detection, attributes) -> dict:
  """`score` for an image already run through `detect`."""
  expected = _expected_scene(attributes)
  found = sorted(detection.objects, key=lambda o: -o.area)[:_MAX_CANDIDATES]
  slots = list(found) + [None] * len(expected.objects)

  def agreement(assignment) -> int:
    return sum((d.colour == e.colour) + (d.shape == e.shape) + (d.size == e.size)
               for e, d in zip(expected.objects, assignment) if d is not None)

  assignments = (tuple(slots[i] for i in chosen)
                 for chosen in itertools.permutations(range(len(slots)), len(expected.objects)))
  matched = max(assignments, key=agreement, default=())
  pairs = list(zip(expected.objects, matched))
  present = all(d is not None for _, d in pairs)
  sized = [(e, d) for e, d in pairs if e.size is not None]
  result = {
      "count": len(detection.objects) == len(expected.objects),
      "colour": present and all(d.colour == e.colour for e, d in pairs),
      "shape": present and all(d.shape == e.shape for e, d in pairs),
      "size": (present and all(d.size == e.size for e, d in sized)) if sized else None,
  }
  if len(expected.objects) == 2:
    result["relation"] = present and shapes_render.relation_between(
        *(d.as_scene_object() for d in matched)) == expected.relation
  else:
    result["relation"] = result["count"]
  result["all"] = all(v for v in result.values() if v is not None)
  return result


def accuracy(scores: Iterable[dict]) -> dict[str, float]:
  """Mean of each score over the images where it applies (size: where a size was named)."""
  totals, counts = {}, {}
  for result in scores:
    for key, value in result.items():
      if value is not None:
        totals[key] = totals.get(key, 0) + bool(value)
        counts[key] = counts.get(key, 0) + 1
  return {key: totals[key] / counts[key] for key in counts}


def degrade(image: np.ndarray, rng: np.random.Generator, noise_std: float = 0.0,
            blur_sigma: float = 0.0, jpeg_quality: int | None = None,
            colour_shift: float = 0.0) -> np.ndarray:
  """A uint8 image made to look like a reconstruction: blur, per-channel colour shift,
  Gaussian noise (std in 0..255 units), then JPEG round trip."""
  out = image.astype(np.float32)
  if blur_sigma:
    out = ndimage.gaussian_filter(out, sigma=(blur_sigma, blur_sigma, 0))
  if colour_shift:
    out = out + rng.uniform(-colour_shift, colour_shift, size=3)
  if noise_std:
    out = out + rng.normal(0, noise_std, size=out.shape)
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  if jpeg_quality is not None:
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, format="jpeg", quality=jpeg_quality)
    out = np.asarray(Image.open(buffer).convert("RGB"))
  return out


DEGRADATIONS: dict[str, dict] = {
    "clean": {},
    "noise": {"noise_std": 10.0},
    "blur": {"blur_sigma": 0.7},
    "jpeg": {"jpeg_quality": 75},
    "colour_shift": {"colour_shift": 30.0},
    # What a dVAE reconstruction roughly does to an image.
    "dvae_like": {"noise_std": 10.0, "blur_sigma": 0.7, "jpeg_quality": 75},
    "harsh": {"noise_std": 10.0, "blur_sigma": 0.7, "jpeg_quality": 75, "colour_shift": 30.0},
}


def self_check(image_size: int, num_images: int, seed: int = 0) -> dict[str, dict[str, float]]:
  """Oracle accuracy against the true attributes of fresh renders, per degradation."""
  rng = np.random.default_rng(seed)
  scenes = [shapes_render.sample_scene(rng, image_size) for _ in range(num_images)]
  images = [shapes_render.render(scene, image_size) for scene in scenes]
  return {name: accuracy(score(degrade(image, rng, **kwargs), scene)
                         for image, scene in zip(images, scenes))
          for name, kwargs in DEGRADATIONS.items()}


_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Side of the rendered test images.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000, "Scenes per degradation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of scenes and degradations.")


def main(argv):
  del argv
  for name, result in self_check(_IMAGE_SIZE.value, _NUM_IMAGES.value, _SEED.value).items():
    print(f"{name:>13}: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.items())))


if __name__ == "__main__":
  app.run(main)
