"""The embedded `shapes` dataset: a TFDS builder of seeded, procedurally drawn scenes.

Each example is a small RGB image of one or two coloured shapes on black, a template caption
and every attribute the generator chose, so generated images can be scored exactly
(`mmjax/tools/shapes_oracle.py`). The test split holds (colour, shape) pairs that train and
validation never show (`HELD_OUT_COLOUR_SHAPES`), for zero-shot evaluation.

  from mmjax.input_pipeline import shapes
  builder = shapes.prepare("/tmp/tfds")                       # 64 px, 50k train; builds once
  builder = shapes.prepare("/tmp/tfds", shapes.config_for(32, num_train=512))
  ds = builder.as_dataset(split="train")                     # or tfds.builder("shapes", ...)

Nothing is downloaded: scenes come from `shapes_render` (pure numpy) and are stored as PNG
bytes encoded here (zlib level 3: ~24 us and ~190 bytes for a 64 px image, where
tf.image.encode_png costs ~500 us per image).
"""

import dataclasses
import os
import struct
import time
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import shapes_render

# One held-out colour per shape (white keeps all six shapes), so every colour and every shape
# still occurs in training, only never together in these pairs.
HELD_OUT_COLOUR_SHAPES: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "circle"),
    ("yellow", "cross"),
    ("magenta", "square"),
    ("cyan", "diamond"),
)
TRAIN_COLOUR_SHAPES: tuple[tuple[str, str], ...] = tuple(
    pair for pair in shapes_render.ALL_COLOUR_SHAPES if pair not in HELD_OUT_COLOUR_SHAPES)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
scene_from_example = shapes_render.scene_from_example
_PNG_COMPRESSION = 3   # zlib level: 5x faster than 6 for ~60% more bytes (still ~190 B/image)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """One variant of the dataset. A custom config needs a name of its own: TFDS stores each
  config under <data_dir>/shapes/<name>/<version>."""
  image_size: int = 64
  num_train: int = 50_000
  num_validation: int = 2_000
  num_test: int = 2_000
  seed: int = 0

  def __post_init__(self):
    if self.image_size < shapes_render.MIN_IMAGE_SIZE:
      raise ConfigError(f"ShapesConfig({self.name!r}).image_size={self.image_size}: expected "
                        f">= {shapes_render.MIN_IMAGE_SIZE}")
    if self.seed < 0:
      raise ConfigError(f"ShapesConfig({self.name!r}).seed={self.seed}: expected >= 0")
    for field in ("num_train", "num_validation", "num_test"):
      if getattr(self, field) < 1:
        raise ConfigError(f"ShapesConfig({self.name!r}).{field}={getattr(self, field)}: "
                          "expected at least 1 example")
    if not self.description:
      self.description = (f"{self.image_size}x{self.image_size} px, {self.num_train} train / "
                          f"{self.num_validation} validation / {self.num_test} test, "
                          f"seed {self.seed}")

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation,
            "test": self.num_test}[split]


_PREDEFINED = tuple(ShapesConfig(name=f"{size}px", image_size=size) for size in (64, 32, 128))


def config_for(image_size: int = 64, num_train: int = 50_000, num_validation: int = 2_000,
               num_test: int = 2_000, seed: int = 0) -> ShapesConfig:
  """The predefined config with these settings, or a new one named after all of them."""
  settings = dict(image_size=image_size, num_train=num_train, num_validation=num_validation,
                  num_test=num_test, seed=seed)
  for config in _PREDEFINED:
    if all(getattr(config, k) == v for k, v in settings.items()):
      return config
  return ShapesConfig(
      name=f"{image_size}px_{num_train}_{num_validation}_{num_test}_seed{seed}", **settings)


def encode_png(image: np.ndarray, compression: int = _PNG_COMPRESSION) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (RGB, 8 bit, no filtering); deterministic."""
  height, width, channels = image.shape
  if channels != 3 or image.dtype != np.uint8:
    raise DataError(f"encode_png expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
  rows = np.zeros((height, width * 3 + 1), np.uint8)  # each row starts with filter type 0
  rows[:, 1:] = image.reshape(height, width * 3)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(rows.tobytes(), compression)) + chunk(b"IEND", b""))


def scene_to_example(scene: shapes_render.Scene, image_size: int, caption: str) -> dict:
  """The feature dict stored for one scene (image as PNG bytes)."""
  objects = scene.objects
  return {
      "image": encode_png(shapes_render.render(objects, image_size)),
      "caption": caption,
      "num_objects": len(objects),
      "objects": {
          "colour": [o.colour for o in objects],
          "shape": [o.shape for o in objects],
          "size": [o.size for o in objects],
          "x": [o.x for o in objects],
          "y": [o.y for o in objects],
      },
      "relation": scene.relation,
      "num_held_out": shapes_render.held_out_count(scene, HELD_OUT_COLOUR_SHAPES),
  }


def generate_scenes(config: ShapesConfig, split: str):
  """Yields (scene, caption) for `split`, deterministically from config.seed."""
  if split not in SPLITS:
    raise DataError(f"split {split!r} is not one of {SPLITS}")
  rng = np.random.default_rng([config.seed, SPLITS.index(split)])
  required = HELD_OUT_COLOUR_SHAPES if split == "test" else ()
  for _ in range(config.num_examples(split)):
    scene = shapes_render.sample_scene(rng, config.image_size,
                                       colour_shapes=TRAIN_COLOUR_SHAPES,
                                       required_colour_shapes=required)
    yield scene, shapes_render.caption(scene, rng)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Seeded scenes of one or two coloured shapes with template captions (no downloads)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(_PREDEFINED)
  DEFAULT_CONFIG_NAME = "64px"
  # TFDS's own shuffle on write stays on: it costs little here (keys hash deterministically, so
  # builds stay byte-identical) and an ordered dataset would refuse `shuffle_files=True`.
  # Nothing is downloaded, so there is no checksums file to look for next to this module. TFDS
  # 4.9.10 resolves that location through `importlib_resources`, which this venv lacks.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    class_label = tfds.features.ClassLabel
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "num_objects": np.int32,
            "objects": tfds.features.Sequence({
                "colour": class_label(names=shapes_render.COLOUR_NAMES),
                "shape": class_label(names=shapes_render.SHAPES),
                "size": class_label(names=shapes_render.SIZES),
                "x": np.int32,   # object centre, pixels
                "y": np.int32,
            }),
            # objects[0] <relation> objects[1]; "none" for one object.
            "relation": class_label(names=shapes_render.RELATIONS),
            # Objects whose (colour, shape) is in HELD_OUT_COLOUR_SHAPES: 0 outside test.
            "num_held_out": np.int32,
        }),
        supervised_keys=("image", "caption"),
        metadata=tfds.core.MetadataDict(
            image_size=size, seed=config.seed,
            num_examples={split: config.num_examples(split) for split in SPLITS},
            held_out_colour_shapes=[list(p) for p in HELD_OUT_COLOUR_SHAPES]),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is drawn here
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    start = time.perf_counter()
    for index, (scene, caption) in enumerate(generate_scenes(config, split)):
      yield index, scene_to_example(scene, config.image_size, caption)
    logging.info("shapes/%s: drew %d %s examples in %.1f s", config.name,
                 config.num_examples(split), split, time.perf_counter() - start)


def prepare(data_dir: str, config: ShapesConfig | str | None = None) -> Shapes:
  """The builder for `config` (default 64px) under `data_dir`, built there first if needed.

  Raises DataError when `data_dir` already holds this config's name built with other settings.
  """
  builder = Shapes(config=config, data_dir=os.fspath(data_dir))
  config = builder.builder_config
  start = time.perf_counter()
  builder.download_and_prepare()
  logging.info("shapes/%s ready in %s (%.1f s)", config.name, builder.data_dir,
               time.perf_counter() - start)
  stored = builder.info.metadata or {}
  expected = {"image_size": config.image_size, "seed": config.seed,
              "num_examples": {s: config.num_examples(s) for s in SPLITS}}
  found = {key: stored.get(key) for key in expected}
  if found != expected:
    raise DataError(f"{builder.data_dir} holds shapes/{config.name} built with {found}, but the "
                    f"config asks for {expected}: give the config another name or delete it")
  return builder
