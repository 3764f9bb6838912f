"""convert_openai_dvae: dall_e modules / state dicts → exported model that reproduces dall_e's outputs."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from dall_e import Decoder as TorchDecoder, Encoder as TorchEncoder

from mmjax.errors import DataError
from mmjax.models import dvae
from mmjax.tools import convert_openai_dvae as convert_lib
from mmjax.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
N_HID, VOCAB, BLOCKS = 64, 512, 1  # dall_e's smallest n_hid / vocab; one block per group keeps it quick


@pytest.fixture(scope="module")
def torch_models():
  torch.manual_seed(0)
  encoder = TorchEncoder(n_hid=N_HID, vocab_size=VOCAB, n_blk_per_group=BLOCKS).eval()
  decoder = TorchDecoder(n_hid=N_HID, vocab_size=VOCAB, n_blk_per_group=BLOCKS, n_init=32).eval()
  with torch.no_grad():
    for module in (encoder, decoder):
      for name, param in module.named_parameters():
        if name.endswith(".b"):
          param.normal_(std=0.05)
  return encoder, decoder


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def run_converter(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough
  return subprocess.run([sys.executable, "-m", "mmjax.tools.convert_openai_dvae", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def torch_outputs(encoder, decoder, images, tokens):
  one_hot = np.eye(VOCAB, dtype=np.float32)[tokens]
  with torch.inference_mode():
    logits = encoder(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    stats = decoder(torch.from_numpy(one_hot.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  return logits, stats


def inputs():
  rng = np.random.default_rng(0)
  return (rng.uniform(0.1, 0.9, (2, 16, 16, 3)).astype(np.float32),
          rng.integers(0, VOCAB, (2, 2, 2)))


def relative_error(got, expected):
  return np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()


def test_module_pickles_convert_and_reproduce_dall_e(torch_models, tmp_path):
  encoder, decoder = torch_models
  torch.save(encoder, tmp_path / "encoder.pkl")  # OpenAI's release format: whole pickled modules
  torch.save(decoder, tmp_path / "decoder.pkl")
  output = tmp_path / "dvae"
  result = run_converter(f"--encoder={tmp_path / 'encoder.pkl'}", f"--decoder={tmp_path / 'decoder.pkl'}",
                         f"--output={output}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "parts=['encoder', 'decoder']" in result.stdout

  params, config = checkpoint.load_model(output, kind="dvae")
  assert (config["n_hid"], config["vocab_size"], config["n_blk_per_group"], config["group_count"],
          config["n_init"]) == (N_HID, VOCAB, BLOCKS, 4, 32)
  model = dvae.from_model_config(config)
  images, tokens = inputs()
  logits = model.apply({"params": params}, images, method=dvae.DVAE.encode)
  stats = model.apply({"params": params}, tokens, method=dvae.DVAE.decode_tokens)
  expected_logits, expected_stats = torch_outputs(encoder, decoder, images, tokens)
  assert relative_error(logits, expected_logits) < 1e-4
  assert relative_error(stats, expected_stats) < 1e-4

  again = run_converter(f"--encoder={tmp_path / 'encoder.pkl'}", f"--output={output}")
  assert again.returncode != 0 and "--overwrite" in again.stderr  # never silently replaced


def test_state_dict_of_one_part_converts_that_part(torch_models, tmp_path):
  encoder, _ = torch_models
  torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
  output = tmp_path / "encoder_only"
  result = run_converter(f"--encoder={tmp_path / 'encoder.pt'}", f"--output={output}", "--dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-2000:]
  params, config = checkpoint.load_model(output, kind="dvae")
  assert config["parts"] == ["encoder"] and set(params) == {"encoder"} and config["dtype"] == "bfloat16"
  model = dvae.from_model_config(config, dtype="float32")
  images, tokens = inputs()
  logits = model.apply({"params": params}, images, method=dvae.DVAE.encode)
  assert relative_error(logits, torch_outputs(encoder, torch_models[1], images, tokens)[0]) < 1e-4


def test_load_state_dict_reads_both_formats(torch_models, tmp_path):
  encoder, _ = torch_models
  torch.save(encoder, tmp_path / "module.pkl")
  torch.save(encoder.state_dict(), tmp_path / "state.pt")
  from_module = convert_lib.load_state_dict(str(tmp_path / "module.pkl"))
  from_state = convert_lib.load_state_dict(str(tmp_path / "state.pt"))
  assert sorted(from_module) == sorted(from_state) == sorted(encoder.state_dict())
  for key, value in encoder.state_dict().items():
    np.testing.assert_array_equal(from_module[key], value.numpy())
  (tmp_path / "junk.pkl").write_bytes(b"not a torch file")
  with pytest.raises(DataError, match=r"junk\.pkl: not a torch save file"):
    convert_lib.load_state_dict(str(tmp_path / "junk.pkl"))
  torch.save([1, 2], tmp_path / "list.pt")
  with pytest.raises(DataError, match=r"list\.pt: holds a list"):
    convert_lib.load_state_dict(str(tmp_path / "list.pt"))


def test_key_mapping():
  assert convert_lib.torch_key(("group_1_block_2", "conv_3", "kernel")) == \
      "blocks.group_1.block_2.res_path.conv_3.w"
  assert convert_lib.torch_key(("group_4_block_1", "id_path", "bias")) == "blocks.group_4.block_1.id_path.b"
  assert convert_lib.torch_key(("input", "kernel")) == "blocks.input.w"
  assert convert_lib.torch_key(("output", "bias")) == "blocks.output.conv.b"


def test_broken_state_dicts_name_the_key(torch_models):
  encoder, decoder = torch_models
  good = state_dict(encoder)

  missing = dict(good)
  del missing["blocks.group_2.block_1.res_path.conv_2.w"]
  with pytest.raises(DataError, match=r"enc: missing key 'blocks\.group_2\.block_1\.res_path\.conv_2\.w'"):
    convert_lib.convert(missing, encoder_source="enc")

  wrong_shape = dict(good)
  wrong_shape["blocks.group_3.block_1.id_path.w"] = np.zeros((256, 100, 1, 1), np.float32)
  with pytest.raises(DataError, match=r"'blocks\.group_3\.block_1\.id_path\.w' has shape \(256, 100, 1, 1\), "
                                      r"expected \(256, 128, 1, 1\)"):
    convert_lib.convert(wrong_shape)

  extra = dict(good, **{"blocks.group_1.block_1.res_path.conv_5.w": np.zeros((1,), np.float32)})
  with pytest.raises(DataError, match=r"1 key\(s\) the dVAE does not use: blocks\.group_1\.block_1\.res_path"
                                      r"\.conv_5\.w"):
    convert_lib.convert(extra)

  with pytest.raises(DataError, match=r"7×7 kernel .*is this a decoder file"):
    convert_lib.convert(state_dict(decoder))
  with pytest.raises(DataError, match=r"disagree on n_hid"):
    convert_lib.convert(good, {k: v for k, v in state_dict(TorchDecoder(n_hid=128, vocab_size=VOCAB,
                                                                       n_blk_per_group=BLOCKS)).items()})
  assert jax.tree.leaves(convert_lib.convert(good)[0])  # the untouched dict still converts


def test_cli_reports_a_broken_file_and_help(torch_models, tmp_path):
  broken = {k: v for k, v in torch_models[1].state_dict().items() if k != "blocks.output.conv.b"}
  torch.save(broken, tmp_path / "decoder.pt")
  result = run_converter(f"--decoder={tmp_path / 'decoder.pt'}", f"--output={tmp_path / 'out'}")
  assert result.returncode != 0
  assert "decoder.pt: missing key 'blocks.output.conv.b'" in result.stderr
  assert not (tmp_path / "out").exists()
  help_result = run_converter("--help")
  assert help_result.returncode == 0
  assert "--encoder" in help_result.stdout and "overwrite" in help_result.stdout
