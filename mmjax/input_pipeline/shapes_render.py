"""Pure-numpy scenes of coloured shapes: sampling, drawing and template captions.

No TensorFlow here: the TFDS builder (`shapes.py`), the oracle (`mmjax/tools/shapes_oracle.py`)
and evaluation code that renders held-out prompts all share these definitions.

A scene holds one or two objects on a black background. Each object is a (colour, shape, size)
drawn as a binary mask of side `side_px(size, image_size)` centred on integer pixel (x, y):
its top-left corner is (x - side // 2, y - side // 2). For two objects, `relation` says where
objects[0] lies relative to objects[1] ("left_of" = objects[0] is to the left of objects[1]).
"""

import dataclasses
import functools
import itertools
import re
from typing import Iterable, Iterator, Sequence

import numpy as np

from mmjax.errors import DataError

# The seven corners of the RGB cube other than black: as far apart as colours can be, and far
# from the black background, so noisy or dimmed pixels still classify by nearest colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: tuple[str, ...] = ("small", "large")
# `objects[0] <relation> objects[1]`; "none" for one-object scenes.
RELATIONS: tuple[str, ...] = ("none", "left_of", "right_of", "above", "below")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
_BACKGROUND_ARRAY = np.array(BACKGROUND, np.uint8)
_COLOUR_ARRAYS = {name: np.array(rgb, np.uint8) for name, rgb in COLOURS.items()}

# Object side as a fraction of the image side, so 32/64/128/256 px scenes look alike.
SIZE_FRACTIONS: dict[str, float] = {"small": 1 / 4, "large": 3 / 8}
# How often a scene holds one object rather than two.
ONE_OBJECT_PROBABILITY = 1 / 3
MIN_IMAGE_SIZE = 16

_INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below",
                     "below": "above", "none": "none"}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  colour: str = "red"
  shape: str = "circle"
  size: str | None = "large"    # None only in scenes parsed from captions that omit it
  x: int = 0                    # centre column in pixels
  y: int = 0                    # centre row in pixels


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[SceneObject, ...] = ()
  relation: str = "none"        # objects[0] <relation> objects[1]

  @property
  def colour_shapes(self) -> tuple[tuple[str, str], ...]:
    return tuple((o.colour, o.shape) for o in self.objects)


ALL_COLOUR_SHAPES: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOUR_NAMES, SHAPES))


def side_px(size: str, image_size: int) -> int:
  """Side in pixels of an object of `size` ("small" | "large") in an `image_size` image."""
  if size not in SIZE_FRACTIONS:
    raise DataError(f"object size {size!r} is not one of {SIZES}")
  return max(3, round(SIZE_FRACTIONS[size] * image_size))


def border_px(image_size: int) -> int:
  """Empty margin kept between every object and the image edge."""
  return max(1, image_size // 32)


def gap_px(image_size: int) -> int:
  """Least empty distance between two objects along their relation's axis."""
  return max(2, round(image_size / 16))


# ---------------------------------------------------------------------------------------------
# Shape masks

def _star_polygon() -> np.ndarray:
  """A five-pointed star, point up, stretched to fill [-1, 1]^2 like every other shape."""
  angles = np.pi / 2 + np.arange(10) * np.pi / 5
  radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)  # fat enough to stay a star at 8 px
  points = np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)
  low, high = points.min(axis=0), points.max(axis=0)
  return 2 * (points - low) / (high - low) - 1


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
  """Even-odd rule, vectorised over points (u, v) and the polygon's edges."""
  inside = np.zeros(u.shape, bool)
  for (u0, v0), (u1, v1) in zip(polygon, np.roll(polygon, -1, axis=0)):
    crosses = (v0 > v) != (v1 > v)
    with np.errstate(divide="ignore", invalid="ignore"):
      u_cross = u0 + (v - v0) * (u1 - u0) / (v1 - v0)
    inside ^= crosses & (u < u_cross)
  return inside


def _shape_membership(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether points of [-1, 1]^2 (v grows downward) lie inside `shape`."""
  if shape == "circle":
    return u * u + v * v <= 1
  if shape == "square":
    return (np.abs(u) <= 1) & (np.abs(v) <= 1)
  if shape == "triangle":  # apex at the top, base along the bottom edge
    return (np.abs(u) <= (v + 1) / 2) & (np.abs(v) <= 1)
  if shape == "diamond":
    return np.abs(u) + np.abs(v) <= 1
  if shape == "cross":
    return (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3)
  if shape == "star":
    return _inside_polygon(u, v, _star_polygon())
  raise DataError(f"shape {shape!r} is not one of {SHAPES}")


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
  """Binary [side, side] mask: a pixel is on when at least half of it (4x4 samples) is inside."""
  samples = 4
  offsets = (np.arange(side * samples) + 0.5) / (side * samples) * 2 - 1
  v, u = np.meshgrid(offsets, offsets, indexing="ij")
  coverage = _shape_membership(shape, u, v).reshape(side, samples, side, samples).mean((1, 3))
  mask = coverage >= 0.5
  mask.setflags(write=False)
  return mask


# ---------------------------------------------------------------------------------------------
# Drawing

def object_box(obj: SceneObject, image_size: int) -> tuple[int, int, int]:
  """(top, left, side) of the object's square in pixels."""
  side = side_px(obj.size, image_size)
  return obj.y - side // 2, obj.x - side // 2, side


@functools.lru_cache(maxsize=None)
def _background(image_size: int) -> np.ndarray:
  # Copying a cached canvas is ~40x faster than broadcasting the colour into a new one.
  canvas = np.empty((image_size, image_size, 3), np.uint8)
  canvas[...] = _BACKGROUND_ARRAY
  canvas.setflags(write=False)
  return canvas


def render(objects: Scene | Sequence[SceneObject], image_size: int = 64) -> np.ndarray:
  """Draws objects on the black background: uint8 [image_size, image_size, 3]."""
  if isinstance(objects, Scene):
    objects = objects.objects
  image = _background(image_size).copy()
  for index, obj in enumerate(objects):
    if obj.colour not in _COLOUR_ARRAYS:
      raise DataError(f"objects[{index}].colour {obj.colour!r} is not one of {COLOUR_NAMES}")
    top, left, side = object_box(obj, image_size)
    if top < 0 or left < 0 or top + side > image_size or left + side > image_size:
      raise DataError(f"objects[{index}] at (x={obj.x}, y={obj.y}) with side {side} does not "
                      f"fit inside a {image_size}x{image_size} image")
    window = image[top:top + side, left:left + side]
    np.copyto(window, _COLOUR_ARRAYS[obj.colour], where=shape_mask(obj.shape, side)[:, :, None])
  return image


# ---------------------------------------------------------------------------------------------
# Sampling

def _place_pair(rng: np.random.Generator, sides: tuple[int, int], relation: str,
                image_size: int) -> list[tuple[int, int]]:
  """(top, left) corners of two squares that lie inside the image, at least gap_px apart along
  the relation's axis, and offset across it by at most half their distance along it.

  Uniform over all such placements: along the axis, the corners of the object that comes first
  (a) and second (b) satisfy border <= a, a + reach <= b <= high, i.e. a < b' = b - reach + 1,
  an ordered pair of distinct values; across it, candidates are rejected (scalar Python math on
  a block of uniforms: numpy calls on tiny arrays cost more than the arithmetic).
  """
  border, gap = border_px(image_size), gap_px(image_size)
  highs = [image_size - border - s for s in sides]
  halves = [s // 2 for s in sides]
  first, second = (0, 1) if relation in ("left_of", "above") else (1, 0)  # order along the axis
  reach = sides[first] + gap
  choices = highs[second] - reach + 2 - border   # values a and b' range over
  if choices < 2:
    raise DataError(f"objects of sides {sides} do not fit side by side in {image_size} px")
  while True:
    for u_a, u_b, u_0, u_1 in rng.random((16, 4)).tolist():
      i, j = int(u_a * choices), int(u_b * (choices - 1))
      j += j >= i                                   # two distinct values, uniformly
      along = [0, 0]
      along[first], along[second] = border + min(i, j), border + max(i, j) + reach - 1
      across = [border + int(u_0 * (highs[0] - border + 1)),
                border + int(u_1 * (highs[1] - border + 1))]
      along_distance = abs(along[1] + halves[1] - along[0] - halves[0])
      if 2 * abs(across[1] + halves[1] - across[0] - halves[0]) <= along_distance:
        if relation in ("left_of", "right_of"):
          return [(across[k], along[k]) for k in range(2)]
        return [(along[k], across[k]) for k in range(2)]


def _pick(options: Sequence, uniform: float):
  """The option a uniform draw in [0, 1) lands on."""
  return options[int(uniform * len(options))]


def sample_scene(rng: np.random.Generator, image_size: int = 64, num_objects: int | None = None,
                 colour_shapes: Sequence[tuple[str, str]] = ALL_COLOUR_SHAPES,
                 required_colour_shapes: Sequence[tuple[str, str]] = ()) -> Scene:
  """A random scene of one or two objects that fit inside the image without touching.

  colour_shapes: the (colour, shape) pairs objects are drawn from.
  required_colour_shapes: if given, one object (chosen at random) is drawn from these instead,
    e.g. held-out pairs for a test split; the other comes from `colour_shapes`.
  Two objects always differ in colour or shape, so a caption names each unambiguously.
  """
  if image_size < MIN_IMAGE_SIZE:
    raise DataError(f"image_size={image_size} is below the smallest supported {MIN_IMAGE_SIZE}")
  if not colour_shapes:
    raise DataError("colour_shapes is empty: no (colour, shape) pair to draw objects from")
  # One block of uniforms per scene: a numpy call costs more than the arithmetic on its result.
  u = rng.random(9).tolist()
  if num_objects is None:
    num_objects = 1 if u[0] < ONE_OBJECT_PROBABILITY else 2
  if num_objects not in (1, 2):
    raise DataError(f"num_objects={num_objects}: scenes hold 1 or 2 objects")
  pools = [colour_shapes] * num_objects
  if required_colour_shapes:
    pools[int(u[1] * num_objects)] = required_colour_shapes
  pairs = [_pick(pools[0], u[2])]
  if num_objects == 2:
    others = [p for p in pools[1] if p != pairs[0]]
    if not others:
      raise DataError(f"no (colour, shape) pair differs from {pairs[0]} in {pools[1]}")
    pairs.append(_pick(others, u[3]))
  sizes = [_pick(SIZES, u[4 + i]) for i in range(num_objects)]
  sides = [side_px(s, image_size) for s in sizes]
  border = border_px(image_size)
  if num_objects == 1:
    positions = image_size - 2 * border - sides[0] + 1
    corners = [(border + int(u[7] * positions), border + int(u[8] * positions))]
    relation = "none"
  else:
    relation = _pick(RELATIONS[1:], u[6])
    corners = _place_pair(rng, (sides[0], sides[1]), relation, image_size)
  objects = tuple(
      SceneObject(colour=c, shape=s, size=z, x=left + side // 2, y=top + side // 2)
      for (c, s), z, side, (top, left) in zip(pairs, sizes, sides, corners))
  return Scene(objects=objects, relation=relation)


# ---------------------------------------------------------------------------------------------
# Captions

ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a}",
    "an image of {a}",
    "a picture of {a}",
    "there is {a}",
    "{a} on a black background",
    "a drawing of {a} on black",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {rel} {b}",
    "{a} is {rel} {b}",
    "there is {a} {rel} {b}",
    "an image of {a} {rel} {b}",
    "{a} placed {rel} {b} on a black background",
)
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}


@dataclasses.dataclass(frozen=True)
class CaptionChoice:
  """Every free choice in a caption; `caption_variants` enumerates them all."""
  template: int = 0
  mention_size: tuple[bool, ...] = (False,)   # per object, in the scene's order
  swap: bool = False                          # name objects[1] first, with the inverse relation
  phrase: int = 0                             # index into RELATION_PHRASES[relation]


def _with_article(words: str) -> str:
  return ("an " if words[0] in "aeiou" else "a ") + words


def _noun_phrase(obj: SceneObject, mention_size: bool) -> str:
  words = f"{obj.colour} {obj.shape}"
  return _with_article(f"{obj.size} {words}" if mention_size and obj.size else words)


def format_caption(scene: Scene, choice: CaptionChoice) -> str:
  """The caption that `choice` selects for `scene` (lower-case)."""
  phrases = [_noun_phrase(o, m) for o, m in zip(scene.objects, choice.mention_size)]
  if len(scene.objects) == 1:
    return ONE_OBJECT_TEMPLATES[choice.template].format(a=phrases[0])
  if len(scene.objects) != 2 or scene.relation not in RELATION_PHRASES:
    raise DataError(f"cannot caption a scene of {len(scene.objects)} objects with relation "
                    f"{scene.relation!r}")
  relation, first, second = scene.relation, phrases[0], phrases[1]
  if choice.swap:
    relation, first, second = _INVERSE_RELATION[relation], second, first
  return TWO_OBJECT_TEMPLATES[choice.template].format(
      a=first, b=second, rel=RELATION_PHRASES[relation][choice.phrase])


def caption_choices(scene: Scene) -> Iterator[CaptionChoice]:
  """Every CaptionChoice available to `scene`."""
  n = len(scene.objects)
  mentions = list(itertools.product((False, True), repeat=n))
  if n == 1:
    for template, mention in itertools.product(range(len(ONE_OBJECT_TEMPLATES)), mentions):
      yield CaptionChoice(template=template, mention_size=mention)
    return
  phrases = range(len(RELATION_PHRASES[scene.relation]))
  for template, mention, swap, phrase in itertools.product(
      range(len(TWO_OBJECT_TEMPLATES)), mentions, (False, True), phrases):
    yield CaptionChoice(template=template, mention_size=mention, swap=swap, phrase=phrase)


def caption_variants(scene: Scene) -> list[str]:
  """Every caption the templates can produce for `scene`."""
  return [format_caption(scene, choice) for choice in caption_choices(scene)]


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """A random template caption of `scene`; each object's size is named half of the time."""
  n = len(scene.objects)
  u = rng.random(5).tolist()
  mention = tuple(m < 0.5 for m in u[:n])
  if n == 1:
    return format_caption(scene, CaptionChoice(
        template=int(u[2] * len(ONE_OBJECT_TEMPLATES)), mention_size=mention))
  phrases = RELATION_PHRASES.get(scene.relation, ("",))
  choice = CaptionChoice(template=int(u[2] * len(TWO_OBJECT_TEMPLATES)), mention_size=mention,
                         swap=u[3] < 0.5, phrase=int(u[4] * len(phrases)))
  return format_caption(scene, choice)


_NOUN_PHRASE = (r"an? (?:(?P<size{i}>" + "|".join(SIZES) + r") )?(?P<colour{i}>"
                + "|".join(COLOUR_NAMES) + r") (?P<shape{i}>" + "|".join(SHAPES) + ")")
_RELATION_PHRASE = "|".join(sorted((re.escape(p) for ps in RELATION_PHRASES.values() for p in ps),
                                   key=len, reverse=True))
_PREFIXES = r"(?:there is |an image of |a picture of |a drawing of )?"
_SUFFIXES = r"(?: on a black background| on black)?"
_ONE_OBJECT_RE = re.compile(f"^{_PREFIXES}{_NOUN_PHRASE.format(i=0)}{_SUFFIXES}$")
_TWO_OBJECT_RE = re.compile(
    f"^{_PREFIXES}{_NOUN_PHRASE.format(i=0)}(?: is| placed)? (?P<rel>{_RELATION_PHRASE}) "
    f"{_NOUN_PHRASE.format(i=1)}{_SUFFIXES}$")
_PHRASE_TO_RELATION = {p: r for r, ps in RELATION_PHRASES.items() for p in ps}


def parse_caption(text: str) -> Scene:
  """The scene a template caption describes (the inverse of `caption`).

  Objects come in the caption's order, `relation` as stated; positions are 0 and a size the
  caption omits is None. Raises DataError for text no template produces.
  """
  normalised = " ".join(text.lower().strip().rstrip(".").split())
  match = _ONE_OBJECT_RE.match(normalised)
  count = 1
  if not match:
    match, count = _TWO_OBJECT_RE.match(normalised), 2
  if not match:
    raise DataError(f"caption {text!r} matches no shapes template (expected e.g. "
                    f"'a red circle' or 'a small blue square to the left of a green triangle')")
  objects = tuple(SceneObject(colour=match[f"colour{i}"], shape=match[f"shape{i}"],
                              size=match[f"size{i}"]) for i in range(count))
  relation = _PHRASE_TO_RELATION[match["rel"]] if count == 2 else "none"
  return Scene(objects=objects, relation=relation)


def scene_from_example(example: dict) -> Scene:
  """A stored example's attributes (a numpy dict as tfds.as_numpy yields; class labels as ints
  or names) -> Scene."""
  def name(value, names: tuple[str, ...]) -> str:
    if isinstance(value, (bytes, np.bytes_)):
      value = value.decode()
    return value if isinstance(value, str) else names[int(value)]

  try:
    objects, count = example["objects"], int(example["num_objects"])
    scene_objects = tuple(
        SceneObject(colour=name(objects["colour"][i], COLOUR_NAMES),
                    shape=name(objects["shape"][i], SHAPES),
                    size=name(objects["size"][i], SIZES),
                    x=int(objects["x"][i]), y=int(objects["y"][i]))
        for i in range(count))
    relation = name(example["relation"], RELATIONS)
  except (KeyError, IndexError, TypeError) as error:
    raise DataError(f"not a shapes example (expected num_objects, relation and objects with "
                    f"colour, shape, size, x, y): {error!r}") from error
  return Scene(objects=scene_objects, relation=relation)


def relation_between(first: SceneObject, second: SceneObject) -> str:
  """Where `first` lies relative to `second`, by the larger of the two centre offsets."""
  dx, dy = first.x - second.x, first.y - second.y
  if abs(dx) >= abs(dy):
    return "left_of" if dx < 0 else "right_of"
  return "above" if dy < 0 else "below"


def held_out_count(scene: Scene, held_out: Iterable[tuple[str, str]]) -> int:
  """How many of the scene's objects have a (colour, shape) pair in `held_out`."""
  held_out = set(held_out)
  return sum(pair in held_out for pair in scene.colour_shapes)
