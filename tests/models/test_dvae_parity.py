"""mmjax's dVAE against OpenAI's `dall_e` package itself: random torch weights, converted by the converter.

Error norm: max|jax − torch| / max|torch| over the whole output tensor (f32 in both frameworks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dall_e import Decoder as TorchDecoder, Encoder as TorchEncoder

from mmjax.models import dvae
from mmjax.tools import convert_openai_dvae

N_HID, VOCAB = 64, 512  # the smallest sizes dall_e accepts
MAX_REL_ERROR = 1e-4


def relative_error(got, expected):
  return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  encoder = TorchEncoder(n_hid=N_HID, vocab_size=VOCAB).eval()
  decoder = TorchDecoder(n_hid=N_HID, vocab_size=VOCAB).eval()
  with torch.no_grad():  # dall_e's biases start at zero; random ones check they land in the right place
    for module in (encoder, decoder):
      for name, param in module.named_parameters():
        if name.endswith(".b"):
          param.normal_(std=0.05)
  state = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}  # noqa: E731
  params, config = convert_openai_dvae.convert(state(encoder), state(decoder))
  model = dvae.from_model_config(config)
  assert model.dtype == jnp.float32 and model.n_hid == N_HID and model.vocab_size == VOCAB
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=dvae.DVAE.encode))
  decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=dvae.DVAE.decode))
  return encoder, decoder, params, encode, decode


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("image_size, batch", [(64, 2), (256, 1)])
def test_encoder_matches_dall_e(models, image_size, batch):
  torch_encoder, _, params, encode, _ = models
  images = np.random.default_rng(image_size).uniform(0.1, 0.9, (batch, image_size, image_size, 3))
  images = images.astype(np.float32)
  with torch.inference_mode():
    expected = torch_encoder(nchw(images)).numpy().transpose(0, 2, 3, 1)
  logits = np.asarray(encode(params, images))
  assert logits.shape == expected.shape == (batch, image_size // 8, image_size // 8, VOCAB)
  assert relative_error(logits, expected) < MAX_REL_ERROR
  assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.999


@pytest.mark.parametrize("image_size, batch", [(64, 2), (256, 1)])
def test_decoder_matches_dall_e(models, image_size, batch):
  _, torch_decoder, params, _, decode = models
  rng = np.random.default_rng(image_size)
  grid = image_size // 8
  one_hot = np.eye(VOCAB, dtype=np.float32)[rng.integers(0, VOCAB, (batch, grid, grid))]
  soft = rng.dirichlet(np.full(VOCAB, 0.1), (batch, grid, grid)).astype(np.float32)  # relaxed codes
  for codes in (one_hot, soft):
    with torch.inference_mode():
      expected = torch_decoder(nchw(codes)).numpy().transpose(0, 2, 3, 1)
    stats = np.asarray(decode(params, codes))
    assert stats.shape == expected.shape == (batch, image_size, image_size, 6)
    assert relative_error(stats, expected) < MAX_REL_ERROR
