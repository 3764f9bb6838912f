"""The shapes dataset: numpy scenes and captions, and the TFDS builder on tiny configs."""

import hashlib
import io
import os
import pathlib
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import shapes
from mmjax.input_pipeline import shapes_render as sr

TINY = shapes.ShapesConfig(name="test_tiny_64px", image_size=64, num_train=300,
                           num_validation=60, num_test=120, seed=3)


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tiny_builder(tiny_data_dir):
  return shapes.prepare(tiny_data_dir, TINY)


@pytest.fixture(scope="module")
def tiny_splits(tiny_builder):
  return {split: list(tfds.as_numpy(tiny_builder.as_dataset(split=split)))
          for split in shapes.SPLITS}


# --- numpy layer -------------------------------------------------------------------------------

def _boxes_overlap(a, b, image_size):
  (top_a, left_a, side_a), (top_b, left_b, side_b) = (sr.object_box(o, image_size) for o in (a, b))
  return not (left_a + side_a <= left_b or left_b + side_b <= left_a or
              top_a + side_a <= top_b or top_b + side_b <= top_a)


@pytest.mark.parametrize("image_size", [32, 64, 128, 256])
def test_scenes_fit_apart_and_match_their_relation(image_size):
  rng = np.random.default_rng(image_size)
  border, gap = sr.border_px(image_size), sr.gap_px(image_size)
  counts = {1: 0, 2: 0}
  for _ in range(400):
    scene = sr.sample_scene(rng, image_size)
    counts[len(scene.objects)] += 1
    for obj in scene.objects:
      top, left, side = sr.object_box(obj, image_size)
      assert border <= top and top + side <= image_size - border
      assert border <= left and left + side <= image_size - border
    if len(scene.objects) == 2:
      first, second = scene.objects
      assert not _boxes_overlap(first, second, image_size)
      assert (first.colour, first.shape) != (second.colour, second.shape)
      assert sr.relation_between(first, second) == scene.relation
      (t0, l0, s0), (t1, l1, s1) = (sr.object_box(o, image_size) for o in scene.objects)
      separation = {"left_of": l1 - (l0 + s0), "right_of": l0 - (l1 + s1),
                    "above": t1 - (t0 + s0), "below": t0 - (t1 + s1)}[scene.relation]
      assert separation >= gap
    else:
      assert scene.relation == "none"
  assert 0.2 < counts[1] / 400 < 0.47  # one object a third of the time


def test_render_draws_each_object_in_its_colour_and_size():
  scene = sr.Scene(objects=(
      sr.SceneObject(colour="red", shape="square", size="large", x=16, y=32),
      sr.SceneObject(colour="cyan", shape="circle", size="small", x=48, y=32)),
      relation="left_of")
  image = sr.render(scene, 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  side_large, side_small = sr.side_px("large", 64), sr.side_px("small", 64)
  red = np.all(image == (255, 0, 0), axis=-1)
  cyan = np.all(image == (0, 255, 255), axis=-1)
  assert red.sum() == side_large ** 2  # a square fills its box
  assert red[32, 16] and cyan[32, 48] and not red[:, 32:].any() and not cyan[:, :32].any()
  assert abs(cyan.sum() - np.pi / 4 * side_small ** 2) < 0.1 * side_small ** 2
  assert np.all(image[~(red | cyan)] == sr.BACKGROUND)
  with pytest.raises(DataError, match="does not fit"):
    sr.render([sr.SceneObject(x=2, y=2)], 64)
  with pytest.raises(DataError, match="colour 'mauve'"):
    sr.render([sr.SceneObject(colour="mauve", x=32, y=32)], 64)


def test_shape_masks_differ_and_fill_their_box():
  for side in (8, 12, 16, 24, 48):
    masks = {shape: sr.shape_mask(shape, side) for shape in sr.SHAPES}
    for shape, mask in masks.items():
      assert mask.any(axis=0)[1:-1].all() and mask.any(axis=1)[1:-1].all(), (shape, side)
    for a in sr.SHAPES:
      for b in sr.SHAPES:
        if a < b:
          assert (masks[a] != masks[b]).sum() >= 0.08 * side * side, (a, b, side)


def test_sampling_is_seeded_and_respects_colour_shape_pools():
  scenes_a = [sr.sample_scene(np.random.default_rng(7), 64) for _ in range(3)]
  scenes_b = [sr.sample_scene(np.random.default_rng(7), 64) for _ in range(3)]
  assert scenes_a == scenes_b
  rng = np.random.default_rng(0)
  pool, required = [("red", "circle"), ("blue", "square")], [("white", "star")]
  for _ in range(200):
    scene = sr.sample_scene(rng, 64, colour_shapes=pool, required_colour_shapes=required)
    pairs = scene.colour_shapes
    assert sum(p in required for p in pairs) == 1
    assert all(p in pool + required for p in pairs)


def test_captions_vary_and_parse_back_for_every_template():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(40):
    scene = sr.sample_scene(rng, 64)
    variants = sr.caption_variants(scene)
    expected_count = (len(sr.ONE_OBJECT_TEMPLATES) * 2 if len(scene.objects) == 1 else
                      len(sr.TWO_OBJECT_TEMPLATES) * 4 * 2 * 3)
    assert len(variants) == len(set(variants)) == expected_count
    for text in variants:
      assert text == text.lower()
      parsed = sr.parse_caption(text)
      order = list(range(len(scene.objects)))
      if (parsed.objects[0].colour, parsed.objects[0].shape) != scene.colour_shapes[0]:
        order.reverse()   # the caption names objects[1] first, with the inverse relation
      for parsed_obj, index in zip(parsed.objects, order):
        truth = scene.objects[index]
        assert (parsed_obj.colour, parsed_obj.shape) == (truth.colour, truth.shape), text
        assert parsed_obj.size in (None, truth.size), text
      if len(scene.objects) == 2:
        stated = parsed.relation if order == [0, 1] else sr._INVERSE_RELATION[parsed.relation]
        assert stated == scene.relation, text
      seen.add(" ".join(text.split()[:2]))
    for _ in range(5):
      assert sr.caption(scene, rng) in variants
  assert len(seen) >= 10  # several openings (templates x articles x sizes)
  with pytest.raises(DataError, match="matches no shapes template"):
    sr.parse_caption("a purple hexagon")


# --- TFDS builder --------------------------------------------------------------------------------

def test_builder_registered_with_configs():
  assert "shapes" in tfds.list_builders()
  assert shapes.Shapes.name == "shapes"
  assert [c.name for c in shapes.Shapes.BUILDER_CONFIGS] == ["64px", "32px", "128px"]
  default = shapes.Shapes.builder_configs[shapes.Shapes.DEFAULT_CONFIG_NAME]
  assert (default.image_size, default.num_train) == (64, 50_000)
  assert shapes.config_for(32) is shapes.Shapes.builder_configs["32px"]
  assert shapes.config_for(32, num_train=512).name == "32px_512_2000_2000_seed0"
  with pytest.raises(ConfigError, match="image_size=4"):
    shapes.ShapesConfig(name="bad", image_size=4)
  with pytest.raises(ConfigError, match="num_test=0"):
    shapes.ShapesConfig(name="bad", num_test=0)
  with pytest.raises(ConfigError, match="seed=-1"):
    shapes.ShapesConfig(name="bad", seed=-1)


def test_feature_spec_and_split_sizes(tiny_builder, tiny_splits, tiny_data_dir):
  features = tiny_builder.info.features
  assert features["image"].shape == (64, 64, 3)
  assert features["objects"]["colour"].names == list(sr.COLOUR_NAMES)
  assert features["objects"]["shape"].names == list(sr.SHAPES)
  assert features["relation"].names == list(sr.RELATIONS)
  assert {s: len(tiny_splits[s]) for s in shapes.SPLITS} == {
      "train": 300, "validation": 60, "test": 120}
  loaded = tfds.builder("shapes", data_dir=str(tiny_data_dir), config=TINY)
  assert isinstance(loaded, shapes.Shapes)
  shuffled = loaded.as_dataset(split="train", shuffle_files=True)  # not an ordered dataset
  assert next(iter(shuffled))["image"].shape == (64, 64, 3)
  assert loaded.info.splits["train"].num_examples == 300
  assert loaded.info.metadata["held_out_colour_shapes"] == [
      list(pair) for pair in shapes.HELD_OUT_COLOUR_SHAPES]


def test_stored_images_match_stored_attributes_and_captions(tiny_splits):
  for example in tiny_splits["train"][:100] + tiny_splits["test"][:50]:
    scene = shapes.scene_from_example(example)
    np.testing.assert_array_equal(example["image"], sr.render(scene, 64))
    caption = example["caption"].decode()
    parsed = sr.parse_caption(caption)
    assert sorted(parsed.colour_shapes) == sorted(scene.colour_shapes), caption
    assert len(scene.objects) == int(example["num_objects"]) in (1, 2)


def test_held_out_pairs_only_in_test(tiny_splits):
  held_out = set(shapes.HELD_OUT_COLOUR_SHAPES)
  assert len(held_out) == 6 and held_out.isdisjoint(shapes.TRAIN_COLOUR_SHAPES)
  assert {c for c, _ in shapes.TRAIN_COLOUR_SHAPES} == set(sr.COLOUR_NAMES)
  assert {s for _, s in shapes.TRAIN_COLOUR_SHAPES} == set(sr.SHAPES)
  for split in ("train", "validation"):
    for example in tiny_splits[split]:
      assert not held_out.intersection(shapes.scene_from_example(example).colour_shapes)
      assert example["num_held_out"] == 0
  for example in tiny_splits["test"]:
    count = sum(p in held_out for p in shapes.scene_from_example(example).colour_shapes)
    assert count == example["num_held_out"] >= 1
  # The generator itself never leaks: a whole train split's worth of scenes.
  big = shapes.config_for(32, num_train=5000, seed=1)
  assert not any(held_out.intersection(scene.colour_shapes)
                 for scene, _ in shapes.generate_scenes(big, "train"))


def _split_digests(builder):
  return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(pathlib.Path(builder.data_dir).glob("*.tfrecord*"))}


def test_builds_are_byte_identical_for_a_seed(tmp_path, tiny_builder):
  again = shapes.prepare(tmp_path / "again", TINY)
  digests = _split_digests(again)
  assert len(digests) == 3 and digests == _split_digests(tiny_builder)
  other_seed = shapes.ShapesConfig(name="test_tiny_seed4", image_size=64, num_train=300,
                                   num_validation=60, num_test=120, seed=4)
  other = _split_digests(shapes.prepare(tmp_path / "other", other_seed))
  assert set(other.values()).isdisjoint(digests.values())


def test_prepare_reuses_a_build_and_rejects_a_clashing_one(tmp_path):
  config = shapes.ShapesConfig(name="test_reuse_32px", image_size=32, num_train=40,
                               num_validation=8, num_test=8)
  builder = shapes.prepare(tmp_path, config)
  train_file = next(pathlib.Path(builder.data_dir).glob("*train.tfrecord*"))
  built_at = train_file.stat().st_mtime_ns
  example = next(iter(tfds.as_numpy(builder.as_dataset(split="validation"))))
  assert example["image"].shape == (32, 32, 3)
  assert shapes.prepare(tmp_path, config).data_dir == builder.data_dir
  assert train_file.stat().st_mtime_ns == built_at
  clash = shapes.ShapesConfig(name="test_reuse_32px", image_size=32, num_train=41,
                              num_validation=8, num_test=8)
  with pytest.raises(DataError, match="test_reuse_32px built with"):
    shapes.prepare(tmp_path, clash)


def test_png_encoding_round_trips_losslessly():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
  encoded = shapes.encode_png(image)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), image)
  with pytest.raises(DataError, match="uint8"):
    shapes.encode_png(image.astype(np.float32))


@pytest.mark.slow
def test_default_50k_build_takes_under_a_minute(tmp_path):
  """The default config (50k train + 2k + 2k at 64 px) builds in under a minute of CPU.

  CPU time rather than wall time: on a shared 2-core machine other jobs stretch the wall
  clock 2-3x (measured 15-30 s wall when the machine is quiet, 83 s at load average 6).
  """
  shapes.prepare(tmp_path / "warm_up", TINY)  # TensorFlow's import is not the build's cost
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  builder = shapes.prepare(tmp_path)
  wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
  assert builder.builder_config.name == "64px"
  assert builder.info.splits["train"].num_examples == 50_000
  size_mb = sum(p.stat().st_size for p in pathlib.Path(builder.data_dir).iterdir()) / 2 ** 20
  print(f"built shapes/64px (50k + 2k + 2k) in {wall:.1f} s wall, {cpu:.1f} s CPU, "
        f"{size_mb:.1f} MiB, load average {os.getloadavg()[0]:.1f}")
  assert cpu < 60
  assert size_mb < 40
