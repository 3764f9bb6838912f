"""`python -m mmjax.tools.dvae encode|decode` with a tiny random dVAE export and real image files."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmjax.errors import DataError
from mmjax.input_pipeline import preprocess
from mmjax.models import dvae
from mmjax.tools import dvae as dvae_tool
from tests.train.test_dvae_encode import GRID, IMAGE_SIZE, VOCAB, save_tiny_dvae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  root = tmp_path_factory.mktemp("dvae_tool")
  model, params = save_tiny_dvae(root / "dvae", seed=1)
  _record_image_size(root / "dvae", IMAGE_SIZE)  # as the dVAE trainer's export does
  images = root / "images"
  (images / "nested").mkdir(parents=True)
  rng = np.random.default_rng(0)
  # Different sizes and formats; smooth gradients plus noise so crops and resizes matter.
  for name, (height, width) in (("a.png", (40, 56)), ("b.jpg", (32, 32)), ("nested/c.png", (70, 48))):
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(images / name)
  (images / "broken.png").write_bytes(b"\x89PNG but not really")
  (images / "notes.txt").write_text("not an image, not listed")
  return {"root": root, "checkpoint": str(root / "dvae"), "images": images, "model": model, "params": params}


def _record_image_size(checkpoint_dir, image_size):
  """Sets (or with None removes) the training image size an export's model.json records."""
  path = os.path.join(checkpoint_dir, "model.json")
  with open(path) as f:
    model_config = json.load(f)
  model_config.pop("image_size", None)
  if image_size is not None:
    model_config["image_size"] = image_size
  with open(path, "w") as f:
    json.dump(model_config, f)


def _tool(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "mmjax.tools.dvae", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180, check=False)


def test_encode_gives_the_models_codes_and_decode_its_images(export, tmp_path):
  model, params, images = export["model"], export["params"], export["images"]
  output = str(tmp_path / "codes.npy")
  # No image size given: the export's recorded one.
  codes, encoded, skipped, image_size = dvae_tool.encode_images(export["checkpoint"], [str(images)], output,
                                                                batch_size=2)
  assert image_size == IMAGE_SIZE
  assert encoded == [str(images / n) for n in ("a.png", "b.jpg", "broken.png", "nested/c.png")
                     if n != "broken.png"]
  assert list(skipped) == [str(images / "broken.png")] and "cannot decode" in skipped[str(images / "broken.png")]
  saved = np.load(output)
  assert saved.dtype == np.int32 and saved.shape == (3, GRID, GRID)
  np.testing.assert_array_equal(saved, codes)
  assert open(tmp_path / "codes.files.txt").read().splitlines() == encoded

  # The same crop by hand (PIL decode, centre square, resize) through the model directly.
  pixels = []
  for path in encoded:
    image = np.asarray(Image.open(path).convert("RGB"))
    pixels.append(preprocess.map_pixels(preprocess.resize_and_crop(image, IMAGE_SIZE), "dvae"))
  direct = model.apply({"params": params}, np.stack(pixels), method=dvae.DVAE.encode_tokens)
  np.testing.assert_array_equal(codes, direct)
  assert len(np.unique(codes)) > 3

  pngs = dvae_tool.decode_codes(export["checkpoint"], output, str(tmp_path / "pngs"), batch_size=2)
  assert [os.path.basename(p) for p in pngs] == ["00000.png", "00001.png", "00002.png"]
  stats = model.apply({"params": params}, codes, method=dvae.DVAE.decode_tokens)
  expected = np.round(np.asarray(dvae.reconstruct_pixels(stats)) * 255).astype(np.uint8)
  for path, want in zip(pngs, expected):
    got = np.asarray(Image.open(path))
    assert got.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)


def test_encode_defaults_to_the_recorded_image_size(export, tmp_path):
  image = str(export["images"] / "b.jpg")
  checkpoint_dir = str(tmp_path / "dvae")
  shutil.copytree(export["checkpoint"], checkpoint_dir)
  grid_at = {}
  for recorded in (16, None):  # None: an export without a record, like converted OpenAI weights
    _record_image_size(checkpoint_dir, recorded)
    codes, _, _, image_size = dvae_tool.encode_images(checkpoint_dir, [image], str(tmp_path / "codes.npy"))
    grid_at[image_size] = codes.shape[1:]
  # 2^(group_count−1) = 4 pixels per code; 256 px is OpenAI's training size.
  assert grid_at == {16: (4, 4), 256: (64, 64)}
  # An explicit size wins over the record.
  codes, _, _, image_size = dvae_tool.encode_images(export["checkpoint"], [image], str(tmp_path / "c.npy"),
                                                    image_size=16)
  assert image_size == 16 and codes.shape == (1, 4, 4)


def test_codes_files_are_checked(export, tmp_path):
  def codes_file(name, array):
    path = str(tmp_path / name)
    np.save(path, array)
    return path

  for path, message in (
      (codes_file("float.npy", np.zeros((2, 4, 4), np.float32)), "dtype float32, expected integer codes"),
      (codes_file("flat.npy", np.zeros((4, 4), np.int32)), r"shape \(4, 4\), expected \[N, h, w\]"),
      (codes_file("big.npy", np.full((1, 2, 2), VOCAB, np.int32)), r"range over \[64, 64\].*64 codes"),
      (codes_file("negative.npy", np.full((1, 2, 2), -1, np.int64)), r"range over \[-1, -1\]"),
      (str(tmp_path / "missing.npy"), "no such file")):
    with pytest.raises(DataError, match=message):
      dvae_tool.load_codes(path, VOCAB)
  text = tmp_path / "codes.txt"
  text.write_text("1 2 3")
  with pytest.raises(DataError, match="not a numpy .npy file"):
    dvae_tool.load_codes(str(text), VOCAB)
  with pytest.raises(DataError, match="--checkpoint=.*no_dvae: no such directory"):
    dvae_tool.decode_codes(str(tmp_path / "no_dvae"), str(text), str(tmp_path / "out"))


@pytest.mark.slow  # two runs that import jax, tensorflow and orbax: ~25 s on an idle 2-core machine
def test_command_line_round_trip_and_errors(export, tmp_path):
  codes = str(tmp_path / "codes.npy")
  missing = str(tmp_path / "missing.png")
  result = _tool("encode", f"--checkpoint={export['checkpoint']}", f"--images={export['images']},{missing}",
                 f"--output={codes}")  # --image_size: the export's recorded size
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Encoded 3 image(s) at {IMAGE_SIZE} px" in result.stdout and "[3, 8, 8]" in result.stdout
  assert "Skipped 2 unreadable image(s)" in result.stdout
  assert "broken.png: cannot decode" in result.stdout and "missing.png: does not exist" in result.stdout

  result = _tool("decode", f"--checkpoint={export['checkpoint']}", f"--codes={codes}",
                 f"--output={tmp_path / 'pngs'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Decoded 3 code grid(s)" in result.stdout
  sizes = [Image.open(tmp_path / "pngs" / name).size for name in sorted(os.listdir(tmp_path / "pngs"))]
  assert sizes == [(IMAGE_SIZE, IMAGE_SIZE)] * 3

  np.save(codes, np.load(codes) + VOCAB)  # every code out of range
  result = _tool("decode", f"--checkpoint={export['checkpoint']}", f"--codes={codes}",
                 f"--output={tmp_path / 'pngs2'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("mmjax.tools.dvae: error: --codes=") and "64 codes" in last, result.stderr[-2000:]
  assert not (tmp_path / "pngs2").exists()


def test_help_and_missing_subcommand():
  result = _tool("--help")
  assert result.returncode == 0 and "encode" in result.stdout and "--image_size" in result.stdout
  result = _tool("--checkpoint=x", "--output=y")
  assert result.returncode != 0
  assert "expected one subcommand, encode or decode" in result.stderr.strip().splitlines()[-1]
