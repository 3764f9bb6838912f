"""bench/matmul_floor.py: the train step's product list matches CLIP's weights, and both frameworks'
products compute the same thing."""

import jax
import numpy as np
import pytest
import torch  # a test extra: installed by `make test`

from mmjax.models import clip
from tests.bench import bench_script

matmul_floor = bench_script.load("matmul_floor")

# clip-anytorch sizes (MLP 4 × width, as OpenAI's model) and the vision heads.
SIZES = dict(embed_dim=16, image_resolution=16, vision_layers=3, vision_width=32, vision_patch_size=8,
             context_length=8, vocab_size=64, transformer_width=24, transformer_heads=3, transformer_layers=2)
VISION_HEADS = 2


def mmjax_clip(sizes, vision_heads):
  return clip.CLIP(embed_dim=sizes["embed_dim"], image_size=sizes["image_resolution"],
                   patch_size=sizes["vision_patch_size"], vision_width=sizes["vision_width"],
                   vision_layers=sizes["vision_layers"], vision_heads=vision_heads,
                   vision_mlp_dim=4 * sizes["vision_width"], context_length=sizes["context_length"],
                   vocab_size=sizes["vocab_size"], text_width=sizes["transformer_width"],
                   text_layers=sizes["transformer_layers"], text_heads=sizes["transformer_heads"],
                   text_mlp_dim=4 * sizes["transformer_width"], dtype="float32")


def test_products_cover_every_transformer_and_patch_kernel():
  params = clip.abstract_params(mmjax_clip(SIZES, VISION_HEADS))
  products = matmul_floor.train_products(SIZES, VISION_HEADS, batch=4)
  tokens = {"visual": (16 // 8) ** 2 + 1, "text": 8}
  linear = [(count, dims) for count, kind, dims in products if kind == "linear"]
  # The product list runs the vision tower's four kernels first, then the text tower's.
  for tower, groups in (("visual", linear[:4]), ("text", linear[4:])):
    kernels = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params[tower]["transformer"])
                  if path[-1].key == "kernel")
    assert sum(count * fan_in * fan_out for count, (_, fan_in, fan_out) in groups) == kernels
    assert all(rows == 4 * tokens[tower] for _, (rows, _, _) in groups)
  [(count, kind, (rows, fan_in, fan_out))] = [p for p in products if p[1] == "patches"]
  assert count == 1 and rows == 4 * 4 and fan_in * fan_out == params["visual"]["patch_embedding"]["kernel"].size
  attention = [dims for _, kind, dims in products if kind == "attention"]
  assert attention == [(4 * VISION_HEADS, 5, 16), (4 * 3, 8, 8)]


@pytest.mark.parametrize("kind,dims", [("linear", (6, 5, 7)), ("patches", (6, 5, 7)), ("attention", (3, 4, 5))])
def test_jax_and_torch_products_agree(kind, dims):
  arrays = matmul_floor.operands(kind, dims)
  got = matmul_floor.jax_products(kind, *arrays)
  expected = matmul_floor.torch_products(kind, *[torch.from_numpy(a) for a in arrays])
  assert len(got) == len(expected) == {"linear": 3, "patches": 2, "attention": 6}[kind]
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e.numpy(), rtol=1e-5, atol=1e-5)


def test_caller_runs_each_group_count_times():
  calls = []
  run = matmul_floor.caller([(2, "a", [1]), (3, "b", [2])], lambda kind, x: calls.append(kind) or x)
  assert run() == 2 and calls == ["a", "a", "b", "b", "b"]
