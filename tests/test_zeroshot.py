"""Zero-shot classification: the classifier math, the tasks' held-out splits, and OpenAI weights end to end
(converted clip-anytorch model + OpenAI's BPE, against the PyTorch model and OpenAI's tokenizer)."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmjax import zeroshot
from mmjax.errors import ConfigError, DataError
from mmjax.input_pipeline import clip_bpe, digits, preprocess, shapes
from mmjax.tools import convert_openai_clip
from mmjax.train import checkpoint
from tests.input_pipeline.test_clip_bpe import openai_rows, openai_tokenizer
from tests.models.test_clip_parity import random_torch_clip

REPO = pathlib.Path(__file__).resolve().parents[1]
# OpenAI's vocabulary and context, so OpenAI's tokenizer drives it; otherwise as small as it gets.
OPENAI_SIZES = dict(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                    context_length=77, vocab_size=clip_bpe.VOCAB_SIZE, transformer_width=64,
                    transformer_heads=1, transformer_layers=1)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_class_embeddings_average_normalised_prompts():
  rng = np.random.default_rng(0)
  table = {f"p{i}": rng.normal(size=4) * (i + 1) for i in range(5)}   # prompt → raw embedding
  prompts = (("p0", "p1"), ("p2",), ("p3", "p4", "p0"))

  def encode(tokens):
    return unit(np.stack([table[t] for t in tokens]))
  classifier = zeroshot.class_embeddings(encode, list, prompts)
  expected = np.stack([unit(np.mean([unit(table[p]) for p in group], axis=0)) for group in prompts])
  np.testing.assert_allclose(classifier, expected, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, rtol=1e-6)
  images = rng.normal(size=(3, 4))
  logits = zeroshot.classify(images, classifier)
  np.testing.assert_allclose(logits, 100 * unit(images) @ expected.T, rtol=1e-5)
  with pytest.raises(ConfigError, match="at least one prompt"):
    zeroshot.class_embeddings(encode, list, (("p0",), ()))


def test_top_k_accuracy():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
  accuracy = zeroshot.top_k_accuracy(logits, [1, 2, 0, 2], ks=(1, 2))
  assert accuracy == {"top1": 0.25, "top2": 0.5}   # row 0 right; row 1's label is second; rows 2, 3 miss


def test_shapes_task_holds_out_colour_shape_pairs():
  task = zeroshot.get_task("shapes")
  assert len(task.class_names) == 42 and task.class_names[0] == "red circle"
  assert task.prompts[0][:2] == ("a red circle", "an image of a red circle")
  test_images, test_labels = zeroshot.labelled_split(task, "test", 32)
  held_out = {task.class_names.index(f"{c} {s}") for c, s in shapes.HELD_OUT_COLOUR_SHAPES}
  assert set(test_labels) == held_out and test_images.shape == (len(test_labels), 32, 32, 3)
  assert 500 < len(test_labels) < 800       # the one-object third of 2,000 test scenes
  _, validation_labels = zeroshot.labelled_split(task, "validation", 32)
  assert not set(validation_labels) & held_out and len(set(validation_labels)) == 36
  # The scenes are the TFDS split's: the same generator and seed draw them.
  scene, _ = next(iter(shapes.generate_scenes(shapes.config_for(32), "test")))
  assert len(scene.objects) != 1 or task.class_names[test_labels[0]] == " ".join(scene.colour_shapes[0])


def test_digits_task_reads_the_held_out_split(tmp_path):
  task = zeroshot.get_task("digits")
  assert task.class_names == digits.DIGIT_WORDS
  assert "a handwritten digit seven" in task.prompts[7] and "a photo of the number 7" in task.prompts[7]
  images, labels = zeroshot.labelled_split(task, "test", 16, str(tmp_path))
  assert images.shape == (len(labels), 16, 16, 3) and sorted(set(labels)) == list(range(10))
  assert images.dtype == np.uint8 and images.max() > 200
  with pytest.raises(ConfigError, match=r"split 'dev'"):
    zeroshot.labelled_split(task, "dev", 16, str(tmp_path))
  with pytest.raises(ConfigError, match=r"zero-shot dataset 'imagenet'"):
    zeroshot.get_task("imagenet")


# ----------------------------------------------------------------------------- OpenAI weights

@pytest.fixture(scope="module")
def openai_export(tmp_path_factory):
  """A random clip-anytorch CLIP with OpenAI's vocabulary, converted as convert_openai_clip does."""
  torch_model = random_torch_clip(OPENAI_SIZES, seed=2)
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params, model_config = convert_openai_clip.convert(state, "random ViT")
  directory = tmp_path_factory.mktemp("openai") / "clip"
  checkpoint.save_model(directory, params, model_config)
  return str(directory), torch_model


def torch_zero_shot_logits(torch_model, pixels, prompts):
  """OpenAI's recipe in PyTorch with OpenAI's tokenizer: the reference for the whole path."""
  reference = openai_tokenizer()
  with torch.inference_mode():
    images = torch_model.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    classes = []
    for class_prompts in prompts:
      tokens = torch.from_numpy(openai_rows(reference, list(class_prompts)))
      classes.append(unit(unit(torch_model.encode_text(tokens).numpy()).mean(axis=0)))
  return 100 * unit(images) @ np.stack(classes).T


def test_openai_weights_match_pytorch_zero_shot(openai_export):
  directory, torch_model = openai_export
  encoder, tokenizer = zeroshot.load(directory, batch_size=64)
  assert isinstance(tokenizer, clip_bpe.ClipTokenizer)   # chosen from model.json's source
  task = zeroshot.get_task("shapes")
  images, _ = zeroshot.labelled_split(task, "test", 32)
  pixels = np.asarray(preprocess.map_pixels(images[:16], "clip"))
  tokenize = lambda texts: tokenizer.tokenize(texts, "clip", 77)  # noqa: E731
  classifier = zeroshot.class_embeddings(encoder.texts, tokenize, task.prompts)
  logits = zeroshot.classify(encoder.images(pixels), classifier)
  expected = torch_zero_shot_logits(torch_model, pixels, task.prompts)
  np.testing.assert_allclose(logits, expected, atol=2e-3 * np.abs(expected).max())
  np.testing.assert_array_equal(np.argmax(logits, 1), np.argmax(expected, 1))


def test_cli_prints_the_api_accuracy(openai_export):
  directory, _ = openai_export
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device
  result = subprocess.run([sys.executable, "-m", "mmjax.zeroshot", f"--checkpoint={directory}",
                           "--dataset=shapes", "--split=test"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  match = re.search(r"shapes/test: (\d+) images, 42 classes: top-1 ([\d.]+)%  top-5 ([\d.]+)%", result.stdout)
  assert match, result.stdout
  encoder, tokenizer = zeroshot.load(directory)
  expected = zeroshot.evaluate(encoder, tokenizer, "shapes", "test")
  assert int(match[1]) == expected["examples"]
  assert float(match[2]) == pytest.approx(100 * expected["top1"], abs=0.006)
  assert float(match[3]) == pytest.approx(100 * expected["top5"], abs=0.006)


def test_a_model_without_a_known_tokenizer_is_refused(tmp_path, openai_export):
  directory, _ = openai_export
  params, model_config = checkpoint.load_model(directory, kind="clip")
  model_config = dict(model_config, vocab_size=1000, source="elsewhere")
  with pytest.raises(DataError, match=r"no tokenizer\.json and not OpenAI weights"):
    zeroshot.load_tokenizer(str(tmp_path), model_config)
  del params
