"""mmjax's CLIP against clip-anytorch's `clip/model.py` (OpenAI's code): random torch weights, converted.

Every torch tensor is perturbed first (clip-anytorch starts biases at zero and LayerNorm gains at
one), so misplaced biases and norms show. Error norm: max|jax − torch| / max|torch| (f32 in both).
"""

import importlib.util
import os

import jax
import numpy as np
import pytest
import torch

from mmjax.models import clip
from mmjax.tools import convert_openai_clip

MAX_EMBEDDING_ERROR, MAX_LOGIT_ERROR = 1e-4, 1e-3
# Text heads are not width // 64 here (3 heads of 32), so the converter's --text_heads path is exercised.
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
            context_length=16, vocab_size=100, transformer_width=96, transformer_heads=3, transformer_layers=2)
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
               transformer_layers=12)


def reference_module():
  """clip-anytorch's model.py, loaded by path (`import clip` needs torchvision)."""
  spec = importlib.util.find_spec("clip")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
  module_spec = importlib.util.spec_from_file_location("clip_anytorch_model", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def random_torch_clip(sizes, seed=0):
  torch.manual_seed(seed)
  model = reference_module().CLIP(**sizes).eval()
  with torch.no_grad():
    for param in model.parameters():
      spread = param.std().item() if param.numel() > 1 else 0.0
      param.add_(torch.randn_like(param) * 0.5 * max(spread, 0.02))
  return model


def random_inputs(sizes, batch, seed=0):
  """NHWC images and token rows <start> ids <end> 0…; the end token is the largest id."""
  rng = np.random.default_rng(seed)
  size, context, vocab = sizes["image_resolution"], sizes["context_length"], sizes["vocab_size"]
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = np.zeros((batch, context), np.int64)
  for row, length in enumerate(np.linspace(3, context - 2, batch).astype(int)):
    tokens[row, 0] = vocab - 2
    tokens[row, 1:length + 1] = rng.integers(1, vocab - 2, length)
    tokens[row, length + 1] = vocab - 1
  return images, tokens


def relative_error(got, expected):
  return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def compare(sizes, batch, scan_layers_options, text_heads=0):
  torch_model = random_torch_clip(sizes)
  images, tokens = random_inputs(sizes, batch)
  with torch.inference_mode():
    torch_images, torch_tokens = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(tokens)
    expected = (torch_model.encode_image(torch_images).numpy(), torch_model.encode_text(torch_tokens).numpy(),
                torch_model(torch_images, torch_tokens)[0].numpy())
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  errors = {}
  for scan_layers in scan_layers_options:
    params, config = convert_openai_clip.convert(state, text_heads=text_heads, scan_layers=scan_layers)
    model = clip.from_model_config(config)
    assert model.scan_layers == scan_layers and model.activation == "quick_gelu"

    @jax.jit
    def run(p, x, t, model=model):
      return (model.apply({"params": p}, x, method=clip.CLIP.encode_image),
              model.apply({"params": p}, t, method=clip.CLIP.encode_text),
              model.apply({"params": p}, x, t, method=clip.CLIP.logits))

    got = run(params, images, tokens.astype(np.int32))
    errors[scan_layers] = [relative_error(g, e) for g, e in zip(got, expected)]
    assert got[2].shape == (batch, batch)
  return errors


def check(errors):
  for scan_layers, (image_error, text_error, logit_error) in errors.items():
    print(f"scan_layers={scan_layers}: image {image_error:.2e}, text {text_error:.2e}, logits {logit_error:.2e}")
    assert image_error < MAX_EMBEDDING_ERROR and text_error < MAX_EMBEDDING_ERROR
    assert logit_error < MAX_LOGIT_ERROR


def test_tiny_vit_matches_openai_code_scanned_and_not():
  check(compare(TINY, batch=2, scan_layers_options=(False, True), text_heads=TINY["transformer_heads"]))


@pytest.mark.slow  # ≈30 s: building and converting 151M random torch parameters
def test_vit_b32_matches_openai_code():
  check(compare(VIT_B32, batch=2, scan_layers_options=(True,)))
