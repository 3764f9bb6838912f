"""convert_openai_clip: clip-anytorch CLIP state dicts / TorchScript / open_clip checkpoints → exported model."""

import importlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from mmjax.errors import DataError
from mmjax.models import clip
from mmjax.tools import convert_openai_clip as convert_lib
from mmjax.train import checkpoint
from tests.models.test_clip_parity import random_inputs, random_torch_clip, reference_module, relative_error

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # tracing the reference model
              pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")]
# Widths of 128 give 2 heads of 64 in both towers, so the CLI's default heads (width // 64) apply.
SIZES = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=16,
             context_length=12, vocab_size=80, transformer_width=128, transformer_heads=2, transformer_layers=2)


@pytest.fixture(scope="module")
def torch_model():
  return random_torch_clip(SIZES, seed=1)


def numpy_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def run_converter(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough
  return subprocess.run([sys.executable, "-m", "mmjax.tools.convert_openai_clip", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def check_against_torch(output, torch_model, scan_layers):
  params, config = checkpoint.load_model(output, kind="clip")
  assert config["scan_layers"] == scan_layers and config["activation"] == "quick_gelu"
  assert (config["image_size"], config["patch_size"], config["vision_heads"], config["text_heads"],
          config["vocab_size"], config["context_length"]) == (32, 16, 2, 2, 80, 12)
  assert ("blocks" in params["text"]["transformer"]) == scan_layers
  model = clip.from_model_config(config)
  images, tokens = random_inputs(SIZES, batch=2, seed=3)
  logits = jax.jit(lambda p: model.apply({"params": p}, images, tokens.astype(np.int32),
                                         method=clip.CLIP.logits))(params)
  with torch.inference_mode():
    expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(tokens))[0]
  assert relative_error(logits, expected.numpy()) < 1e-4


def test_state_dict_converts_through_the_cli(torch_model, tmp_path):
  state = dict(torch_model.state_dict())
  # OpenAI's TorchScript state dicts carry these non-weight entries; they are dropped.
  state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(12), vocab_size=torch.tensor(80))
  torch.save(state, tmp_path / "clip.pt")
  output = tmp_path / "clip"
  result = run_converter(f"--input={tmp_path / 'clip.pt'}", f"--output={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "'vision_width': 128" in result.stdout and "parameters)" in result.stdout
  check_against_torch(output, torch_model, scan_layers=False)

  again = run_converter(f"--input={tmp_path / 'clip.pt'}", f"--output={output}")
  assert again.returncode != 0 and "--overwrite" in again.stderr  # never silently replaced


def test_torchscript_archive_converts_through_the_cli(torch_model, tmp_path):
  images, tokens = random_inputs(SIZES, batch=1)
  with torch.no_grad():  # OpenAI's released .pt files are traced TorchScript archives like this one
    traced = torch.jit.trace(torch_model, (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                           torch.from_numpy(tokens)))
  traced.save(str(tmp_path / "ViT-tiny.pt"))
  output = tmp_path / "scanned"
  result = run_converter(f"--input={tmp_path / 'ViT-tiny.pt'}", f"--output={output}", "--scan_layers")
  assert result.returncode == 0, result.stderr[-2000:]
  check_against_torch(output, torch_model, scan_layers=True)


def test_open_clip_checkpoints_and_torchscript_read_as_openai_keys(torch_model, tmp_path):
  expected = numpy_state(torch_model)
  wrapped = {"epoch": 3, "name": "ViT-tiny", "state_dict": {f"module.{k}": v for k, v in
                                                             torch_model.state_dict().items()}}
  torch.save(wrapped, tmp_path / "epoch_3.pt")
  images, tokens = random_inputs(SIZES, batch=1)
  with torch.no_grad():  # (torch.jit.script fails on clip-anytorch's LayerNorm subclass: trace it)
    torch.jit.trace(torch_model, (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                  torch.from_numpy(tokens))).save(str(tmp_path / "traced.pt"))
  for name in ("epoch_3.pt", "traced.pt"):
    state = convert_lib.read_checkpoint(str(tmp_path / name))
    assert sorted(state) == sorted(expected), name
    for key, value in expected.items():
      np.testing.assert_array_equal(state[key], value)
  params, _ = convert_lib.convert(convert_lib.read_checkpoint(str(tmp_path / "epoch_3.pt")))
  direct, _ = convert_lib.convert(expected)
  jax.tree.map(np.testing.assert_array_equal, params, direct)


def test_key_mapping():
  assert convert_lib.torch_key(("visual", "transformer", "blocks_11", "attn", "value", "kernel")) == \
      "visual.transformer.resblocks.11.attn.in_proj_weight"
  assert convert_lib.torch_key(("text", "transformer", "blocks_0", "attn", "out", "bias")) == \
      "transformer.resblocks.0.attn.out_proj.bias"
  assert convert_lib.torch_key(("text", "transformer", "blocks_2", "mlp", "fc", "kernel")) == \
      "transformer.resblocks.2.mlp.c_fc.weight"
  assert convert_lib.torch_key(("visual", "transformer", "blocks_1", "ln_2", "scale")) == \
      "visual.transformer.resblocks.1.ln_2.weight"
  assert convert_lib.torch_key(("text", "ln_final", "bias")) == "ln_final.bias"
  assert convert_lib.torch_key(("visual", "patch_embedding", "kernel")) == "visual.conv1.weight"
  assert convert_lib.torch_key(("logit_scale",)) == "logit_scale"


def test_broken_state_dicts_name_the_problem(torch_model, tmp_path):
  good = numpy_state(torch_model)

  def fails(state, match, **kwargs):
    with pytest.raises(DataError, match=match):
      convert_lib.convert(convert_lib.prepare_state(state, "ckpt"), "ckpt", **kwargs)

  fails({k: v for k, v in good.items() if k != "transformer.resblocks.1.ln_2.bias"},
        r"ckpt: missing key 'transformer\.resblocks\.1\.ln_2\.bias'")
  fails({k: v for k, v in good.items() if k != "visual.conv1.weight"}, r"missing key 'visual\.conv1\.weight'")
  fails({k: v for k, v in good.items() if k != "logit_scale"}, r"missing key 'logit_scale'")
  fails({**good, "visual.transformer.resblocks.0.attn.in_proj_bias": np.zeros(100, np.float32)},
        r"'visual\.transformer\.resblocks\.0\.attn\.in_proj_bias' has shape \(100,\), expected \(384,\)")
  fails({**good, "visual.transformer.resblocks.0.ls_1.gamma": np.ones(128, np.float32)},
        r"1 key\(s\) the CLIP ViT does not use: visual\.transformer\.resblocks\.0\.ls_1\.gamma")
  fails({**good, "text_projection": np.zeros((128, 16), np.float32)}, r"disagree on embed_dim: 32 vs 16")
  fails({**good, "visual.layer1.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}, r"ResNet CLIP")
  fails({f"text.{k}" if not k.startswith("visual") else k: v for k, v in good.items()},
        r"under 'text\.' \(open_clip's CustomTextCLIP\)")
  fails(good, r"text width 128 is not divisible by --text_heads=3", text_heads=3)
  fails(good, r"activation='relu'", activation="relu")

  (tmp_path / "junk.pt").write_bytes(b"not a torch file")
  with pytest.raises(DataError, match=r"junk\.pt: not a torch save file"):
    convert_lib.read_checkpoint(str(tmp_path / "junk.pt"))
  torch.save({"weights": [1, 2]}, tmp_path / "list.pt")
  with pytest.raises(DataError, match=r"list\.pt: key 'weights' holds a list, expected a tensor"):
    convert_lib.read_checkpoint(str(tmp_path / "list.pt"))


def test_cli_reports_a_broken_file(torch_model, tmp_path):
  broken = {k: v for k, v in torch_model.state_dict().items() if k != "visual.proj"}
  torch.save(broken, tmp_path / "broken.pt")
  result = run_converter(f"--input={tmp_path / 'broken.pt'}", f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "broken.pt: missing key 'visual.proj'" in result.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, sizes", [
    ("clip_vit_b32", dict(vision_patch_size=32, image_resolution=224, vision_width=768, vision_layers=12,
                          embed_dim=512, transformer_width=512, transformer_heads=8)),
    ("clip_vit_b16", dict(vision_patch_size=16, image_resolution=224, vision_width=768, vision_layers=12,
                          embed_dim=512, transformer_width=512, transformer_heads=8)),
    ("clip_vit_l14", dict(vision_patch_size=14, image_resolution=224, vision_width=1024, vision_layers=24,
                          embed_dim=768, transformer_width=768, transformer_heads=12)),
    ("clip_vit_l14_336", dict(vision_patch_size=14, image_resolution=336, vision_width=1024, vision_layers=24,
                              embed_dim=768, transformer_width=768, transformer_heads=12)),
])
def test_full_size_openai_architectures_map_onto_the_configs(name, sizes):
  """OpenAI's architectures built on torch's meta device (shapes only): every key maps onto the config's model."""
  with torch.device("meta"):
    torch_clip = reference_module().CLIP(context_length=77, vocab_size=49408, transformer_layers=12, **sizes)
  state = dict(torch_clip.state_dict())
  config_model = dict(importlib.import_module(f"mmjax.configs.{name}").get_config().model)
  fields = convert_lib.infer_fields(state)
  assert fields == {k: config_model[k] for k in fields}
  model = clip.from_model_config(config_model, scan_layers=False)
  plan = convert_lib.key_plan(state, clip.abstract_params(model))
  assert {key for _, key, _ in plan} == set(state)  # every torch tensor lands somewhere
  assert len(plan) == len(state) + 4 * (model.vision_layers + model.text_layers)  # in_proj feeds q, k, v
