"""Decoding real image bytes (good and corrupt), crops, pixel maps and skip counting."""

import io
import logging
import os

import numpy as np
from PIL import Image
import pytest
import sklearn.datasets
import tensorflow as tf

from mmjax.errors import ConfigError
from mmjax.input_pipeline import preprocess

CHINA_JPG = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", "china.jpg")


def encode(pixels: np.ndarray, image_format: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, image_format, **kwargs)
  return buffer.getvalue()


def china_bytes() -> bytes:
  with open(CHINA_JPG, "rb") as f:
    return f.read()


def small_rgb(seed=0, shape=(9, 13, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def bad_inputs() -> dict[str, bytes]:
  jpeg = china_bytes()
  return {
      "truncated_jpeg": jpeg[:len(jpeg) // 3],
      "random_bytes": np.random.default_rng(1).bytes(2000),
      "text_named_jpg": b"a caption file saved by mistake as cat.jpg\n",
      "empty": b"",
      "truncated_png": encode(small_rgb(), "PNG")[:60],
  }


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("image_format,kwargs", [
    ("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", None)])
def test_decode_lossless_formats_exactly(image_format, kwargs):
  pixels = small_rgb()
  if kwargs is None:  # TIFF is not a format TF decodes: it must fail cleanly, not crash
    _, ok = preprocess.try_decode_image(encode(pixels, image_format))
    assert not bool(ok)
    return
  decoded = preprocess.decode_image(encode(pixels, image_format, **kwargs))
  assert decoded.dtype == tf.uint8
  np.testing.assert_array_equal(decoded.numpy(), pixels)


def test_decode_jpeg_matches_pil():
  decoded = preprocess.decode_image(china_bytes()).numpy()
  expected = np.asarray(Image.open(CHINA_JPG).convert("RGB"))
  assert decoded.shape == (427, 640, 3)
  np.testing.assert_array_equal(decoded, expected)  # same libjpeg, accurate IDCT


def test_decode_grayscale_replicates_value_to_three_channels():
  gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
  decoded = preprocess.decode_image(encode(gray, "PNG")).numpy()
  assert decoded.shape == (5, 7, 3)
  for channel in range(3):
    np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_decode_rgba_drops_alpha_and_keeps_stored_colour():
  rgba = small_rgb(shape=(6, 4, 4))
  rgba[0, :, 3] = 0  # a transparent row keeps its stored colour: alpha is dropped, not composited
  decoded = preprocess.decode_image(encode(rgba, "PNG")).numpy()
  np.testing.assert_array_equal(decoded, rgba[:, :, :3])


def test_decode_animated_gif_gives_first_frame():
  red = Image.fromarray(np.full((5, 6, 3), (255, 0, 0), np.uint8))
  blue = Image.fromarray(np.full((5, 6, 3), (0, 0, 255), np.uint8))
  buffer = io.BytesIO()
  red.save(buffer, "GIF", save_all=True, append_images=[blue])
  decoded = preprocess.decode_image(buffer.getvalue()).numpy()
  assert decoded.shape == (5, 6, 3)
  np.testing.assert_array_equal(decoded.reshape(-1, 3), np.tile([255, 0, 0], (30, 1)))


@pytest.mark.parametrize("num_parallel_calls", [None, tf.data.AUTOTUNE])
def test_try_decode_flags_every_bad_input(num_parallel_calls):
  good = [encode(small_rgb(seed), "PNG") for seed in range(3)]
  items = [good[0], *bad_inputs().values(), good[1], good[2]]
  dataset = tf.data.Dataset.from_tensor_slices(items).map(
      preprocess.try_decode_image, num_parallel_calls=num_parallel_calls)
  results = list(dataset.as_numpy_iterator())
  assert [bool(ok) for _, ok in results] == [True] + [False] * 5 + [True, True]
  np.testing.assert_array_equal(results[6][0], small_rgb(1))


# ----------------------------------------------------------------------------- skip counting

@pytest.mark.parametrize("num_parallel_calls", [None, tf.data.AUTOTUNE])
def test_skip_counter_counts_each_drop_exactly(num_parallel_calls, caplog):
  good = [encode(small_rgb(seed), "PNG") for seed in range(4)]
  bad = list(bad_inputs().values())
  items = [b for pair in zip(good, bad) for b in pair] + bad[len(good):]
  captions = ["a", " ", "b", "c", "", "d", "e", "f", "g"]
  counter = preprocess.SkipCounter("test")
  dataset = tf.data.Dataset.from_tensor_slices({"bytes": items, "caption": captions})
  dataset = counter.drop_unless(
      dataset, lambda ex: tf.strings.length(tf.strings.strip(ex["caption"])) > 0, "empty_caption")
  dataset = dataset.map(
      lambda ex: {**ex, "decoded": preprocess.try_decode_image(ex["bytes"])},
      num_parallel_calls=num_parallel_calls)
  dataset = counter.drop_unless(dataset, lambda ex: ex["decoded"][1], "undecodable_image")
  dataset = dataset.prefetch(4)

  kept = [ex["caption"] for ex in dataset.as_numpy_iterator()]
  # items: good0 bad0 good1 bad1 good2 bad2 good3 bad3 bad4; captions 1 and 4 are blank
  assert kept == [b"a", b"b", b"e"]  # good2 had the blank caption
  assert counter.counts() == {"empty_caption": 2, "undecodable_image": 4}

  list(dataset.as_numpy_iterator())  # a second pass counts again
  assert counter.counts() == {"empty_caption": 4, "undecodable_image": 8}
  counter.add("missing_caption", 3)
  assert counter.total() == 15

  with caplog.at_level(logging.INFO):
    counter.log()
  assert "skipped 15" in caplog.text and "undecodable_image: 8" in caplog.text


# ----------------------------------------------------------------------------- resize and crop

def striped(height, width, side_colour=(255, 0, 0), middle_colour=(0, 255, 0)):
  """Centre square in `middle_colour`, the rest of the longer side in `side_colour`."""
  image = np.empty((height, width, 3), np.uint8)
  image[:] = side_colour
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = middle_colour
  return image


@pytest.mark.parametrize("shape", [(6, 12), (12, 6), (7, 7)])
def test_centre_crop_keeps_the_centre_square(shape):
  out = preprocess.resize_and_crop(tf.constant(striped(*shape)), 3).numpy()
  assert out.shape == (3, 3, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out.reshape(-1, 3), np.tile([0, 255, 0], (9, 1)))


def test_resize_upsamples_tiny_digit_sized_images():
  image = np.zeros((8, 8, 3), np.uint8)
  image[:, 4:] = 200
  out = preprocess.resize_and_crop(tf.constant(image), 32).numpy()
  assert out.shape == (32, 32, 3)
  assert (out[:, :14] == 0).all() and (out[:, 18:] == 200).all()


def test_squares_already_at_size_skip_the_resize(monkeypatch):
  resizes = []
  real_resize = tf.image.resize
  monkeypatch.setattr(tf.image, "resize", lambda *a, **k: resizes.append(1) or real_resize(*a, **k))
  noise = small_rgb(shape=(16, 22, 3))
  out = preprocess.resize_and_crop(tf.constant(noise), 16).numpy()
  np.testing.assert_array_equal(out, noise[:, 3:19])  # the centre crop, every pixel kept
  square = preprocess.resize_and_crop(tf.constant(noise[:, :16]), 16).numpy()
  np.testing.assert_array_equal(square, noise[:, :16])
  assert not resizes
  assert preprocess.resize_and_crop(tf.constant(noise), 8).shape == (8, 8, 3)
  assert len(resizes) == 1

  # inside tf.data, where image sizes are unknown until run time, the shape stays static
  dataset = tf.data.Dataset.from_generator(
      lambda: iter([noise, noise[:12, :12]]), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  dataset = dataset.map(lambda image: preprocess.resize_and_crop(image, 16))
  assert dataset.element_spec.shape == (16, 16, 3)
  same_size, upsampled = list(dataset.as_numpy_iterator())
  np.testing.assert_array_equal(same_size, noise[:, 3:19])
  np.testing.assert_array_equal(
      upsampled, tf.cast(tf.round(real_resize(noise[:12, :12], [16, 16], antialias=True)), tf.uint8))


def test_random_crop_is_a_seeded_window_of_the_image():
  columns = np.arange(16, dtype=np.uint8) * 15
  image = np.broadcast_to(columns[None, :, None], (4, 16, 3)).copy()
  offsets = []
  for seed in range(12):
    out = preprocess.resize_and_crop(tf.constant(image), 4, random_crop=True,
                                     seed=preprocess.element_seed(seed, 0)).numpy()
    again = preprocess.resize_and_crop(tf.constant(image), 4, random_crop=True,
                                       seed=preprocess.element_seed(seed, 0)).numpy()
    np.testing.assert_array_equal(out, again)
    offset = int(out[0, 0, 0]) // 15
    np.testing.assert_array_equal(out, image[:, offset:offset + 4])
    offsets.append(offset)
  assert len(set(offsets)) > 3
  with pytest.raises(ValueError, match="seed"):
    preprocess.resize_and_crop(tf.constant(image), 4, random_crop=True)


def test_random_shift_translates_with_black_fill_by_at_most_the_limit():
  image = np.zeros((8, 8, 3), np.uint8)
  image[3, 4] = 255                       # one white pixel: where it lands is the shift
  shifts = set()
  for seed in range(30):
    out = preprocess.random_shift(tf.constant(image), 2, preprocess.element_seed(seed, 0)).numpy()
    again = preprocess.random_shift(tf.constant(image), 2, preprocess.element_seed(seed, 0)).numpy()
    np.testing.assert_array_equal(out, again)
    assert out.shape == image.shape and out.sum() == 3 * 255   # nothing else added or lost
    (row,), (column,) = np.nonzero(out[..., 0])
    shifts.add((int(row) - 3, int(column) - 4))
  assert all(abs(dy) <= 2 and abs(dx) <= 2 for dy, dx in shifts) and len(shifts) > 8
  np.testing.assert_array_equal(preprocess.random_shift(tf.constant(image), 0, None), image)


def test_maybe_grayscale_greys_the_image_and_drops_the_words_together():
  image = np.zeros((4, 4, 3), np.uint8)
  image[1, 1] = (255, 0, 0)
  image[2, 2] = (255, 255, 0)
  caption = tf.constant("a small red circle above a yellow square")
  outcomes = []
  for seed in range(40):
    out, text = preprocess.maybe_grayscale(tf.constant(image), caption, 0.5, ("red", "yellow"),
                                           preprocess.element_seed(seed, 0))
    out, text = out.numpy(), text.numpy().decode()
    grey = text == "a small circle above a square"
    assert grey or text == caption.numpy().decode()
    if grey:  # channel means, rounded: red 85, yellow 170, black stays black
      np.testing.assert_array_equal(out[..., 0], [[0] * 4, [0, 85, 0, 0], [0, 0, 170, 0], [0] * 4])
      assert (out == out[..., :1]).all()
    else:
      np.testing.assert_array_equal(out, image)
    outcomes.append(grey)
  assert 8 < sum(outcomes) < 32    # about half, and keyed on the seed alone:
  again, _ = preprocess.maybe_grayscale(tf.constant(image), caption, 0.5, ("red",), preprocess.element_seed(0, 0))
  assert (again.numpy() == image).all() != outcomes[0]
  same, text = preprocess.maybe_grayscale(tf.constant(image), caption, 0.0, ("red",), None)
  assert (same.numpy() == image).all() and text.numpy() == caption.numpy()


def test_maybe_grayscale_draws_once_per_row_of_a_batch():
  images = np.zeros((64, 2, 2, 3), np.uint8)
  images[:, 0, 0] = (255, 0, 0)
  captions = tf.constant(["a red square"] * 64)
  out, texts = preprocess.maybe_grayscale(tf.constant(images), captions, 0.5, ("red",),
                                          preprocess.element_seed(3, 0))
  grey_rows = np.array([t.decode() == "a square" for t in texts.numpy()])
  np.testing.assert_array_equal(out.numpy()[:, 0, 0, 1] == 85, grey_rows)  # the row's image and caption agree
  np.testing.assert_array_equal(out.numpy()[~grey_rows], images[~grey_rows])
  assert 16 < grey_rows.sum() < 48


def test_element_seed_differs_per_index():
  seeds = {tuple(preprocess.element_seed(7, process, i).numpy()) for process in range(2)
           for i in range(5)}
  assert len(seeds) == 10


# ----------------------------------------------------------------------------- pixel maps

def test_map_pixels_values():
  image = tf.constant([[[0, 255, 51]]], tf.uint8)
  np.testing.assert_allclose(preprocess.map_pixels(image, "dvae").numpy(),
                             [[[0.1, 0.9, 0.1 + 0.2 * 0.8]]], rtol=1e-6)
  np.testing.assert_allclose(preprocess.map_pixels(image, "unit").numpy(), [[[0.0, 1.0, 0.2]]],
                             rtol=1e-6)
  expected_clip = (np.array([0.0, 1.0, 0.2]) - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
  np.testing.assert_allclose(preprocess.map_pixels(image, "clip").numpy()[0, 0], expected_clip,
                             rtol=1e-5)
  assert preprocess.map_pixels(image, "clip").dtype == tf.float32


@pytest.mark.parametrize("pixel_map", preprocess.PIXEL_MAPS)
def test_unmap_inverts_map_for_numpy_and_tf(pixel_map):
  every_value = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
  image = tf.constant(every_value.astype(np.uint8))
  mapped = preprocess.map_pixels(image, pixel_map)
  from_tf = preprocess.unmap_pixels(mapped, pixel_map)
  from_numpy = preprocess.unmap_pixels(mapped.numpy(), pixel_map)
  assert tf.is_tensor(from_tf) and from_tf.dtype == tf.uint8
  assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.uint8
  np.testing.assert_array_equal(from_tf.numpy(), every_value)
  np.testing.assert_array_equal(from_numpy, every_value)
  # out-of-range model outputs are clipped, not wrapped
  np.testing.assert_array_equal(preprocess.unmap_pixels(np.full((1, 1, 3), 50.0), pixel_map), 255)


def test_unknown_pixel_map_names_the_config_field():
  with pytest.raises(ConfigError, match=r"config\.data\.pixel_map.*dvae, clip, unit"):
    preprocess.map_pixels(tf.zeros([2, 2, 3], tf.uint8), "imagenet")
  with pytest.raises(ConfigError, match=r"config\.data\.pixel_map"):
    preprocess.unmap_pixels(np.zeros([2, 2, 3]), "")
