r"""Encode images to dVAE codes, or decode codes back to images, with an exported dVAE.

  python -m mmjax.tools.dvae encode --checkpoint=DIR --images=a.png,b.jpg --output=codes.npy
  python -m mmjax.tools.dvae encode --checkpoint=DIR --images=photos/ --output=codes.npy --image_size=64
  python -m mmjax.tools.dvae decode --checkpoint=DIR --codes=codes.npy --output=pngs/

encode: --images lists image files and/or directories (searched recursively for .jpg .jpeg .png
  .gif .bmp .webp). Each image is decoded, centre-cropped to a square, resized to --image_size
  (by default the size the dVAE was trained at, recorded in its model.json by the dVAE trainer;
  256, OpenAI's, for converted weights, which record none) and mapped with the dVAE pixel map; the
  argmax codes go to --output as int32 [N, h, w], and the image each row came from to
  <output>.files.txt. Images that cannot be read are skipped, counted and named.
decode: --codes is an int32 [N, h, w] .npy of codes below the dVAE's vocab size; writes one PNG
  per grid, 00000.png, 00001.png, ..., of h·2^(group_count−1) pixels a side.

--checkpoint is an exported dVAE (params/ + model.json), e.g. <workdir>/dvae or the output of
mmjax.tools.convert_openai_dvae. Runs on one device, --batch_size images at a time.
"""

import os
import re
import sys

from absl import app, flags, logging

from mmjax import cli
from mmjax.errors import ConfigError, DataError

SUBCOMMANDS = ("encode", "decode")
NPY_MAGIC = b"\x93NUMPY"
PROGRAM = "mmjax.tools.dvae"


# ----------------------------------------------------------------------------- shared

def _single_device_dvae(checkpoint_dir, need, dtype):
  """(module, params, param shardings, mesh, rules, model_config) on the first local device."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.configs import common  # pylint: disable=g-import-not-at-top
  from mmjax.train import dvae_encode  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(common.mesh_config(data=1), devices=jax.local_devices()[:1])
  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  model, params, shardings, model_config = dvae_encode.load_dvae(checkpoint_dir, mesh, rules, need, dtype)
  return model, params, shardings, mesh, rules, model_config


def _require_checkpoint(checkpoint_dir):
  if not os.path.isdir(checkpoint_dir):
    raise DataError(f"--checkpoint={checkpoint_dir}: no such directory; expected an exported dVAE "
                    "(params/ + model.json)")


def _batches(count, batch_size):
  for start in range(0, count, batch_size):
    yield start, min(start + batch_size, count)


# ----------------------------------------------------------------------------- encode

def list_images(items):
  """Image files named in `items` (files, or directories searched recursively), in order given;
  a directory's files sorted. Returns (paths, missing) where missing names paths that do not exist."""
  from mmjax.input_pipeline import user_data  # pylint: disable=g-import-not-at-top
  paths, missing = [], []
  for item in items:
    if os.path.isdir(item):
      found = [os.path.join(root, name) for root, _, names in os.walk(item) for name in names
               if name.lower().endswith(user_data.IMAGE_EXTENSIONS)]
      paths.extend(sorted(found))
    elif os.path.isfile(item):
      paths.append(item)
    else:
      missing.append(item)
  return paths, missing


def load_image(path, image_size):
  """(dVAE-mapped float32 [S, S, 3] after a centre crop and resize, None), or (None, why not)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmjax.input_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      image = preprocess.decode_image(tf.constant(f.read()))
  except (OSError, tf.errors.OpError) as e:
    return None, f"cannot decode ({_short_reason(e)})"
  return preprocess.map_pixels(preprocess.resize_and_crop(image, image_size), "dvae").numpy(), None


def encode_images(checkpoint_dir, items, output, image_size=None, batch_size=32, dtype=""):
  """Encodes the images `items` name at `image_size` (None: the size the dVAE was trained at);
  writes codes [N, h, w] int32 to `output` and the source of each row to <output>.files.txt.
  Returns (codes, encoded paths, {skipped path: reason}, the image size used)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.train import dvae_encode  # pylint: disable=g-import-not-at-top
  _require_checkpoint(checkpoint_dir)
  model, params, shardings, mesh, rules, model_config = _single_device_dvae(checkpoint_dir, "encoder", dtype)
  image_size = image_size or dvae_encode.trained_image_size(model_config)
  grid = dvae_encode.grid_size(model, image_size, field="--image_size")
  paths, missing = list_images(items)
  skipped = {path: "does not exist" for path in missing}
  images, encoded = [], []
  for path in paths:
    image, reason = load_image(path, image_size)
    if reason:
      skipped[path] = reason
    else:
      images.append(image)
      encoded.append(path)
  if not images:
    raise DataError(f"--images={','.join(items)}: no readable images"
                    + (f" ({len(skipped)} skipped: {_describe(skipped)})" if skipped else ""))
  step = dvae_encode.encode_step(model, shardings, mesh, rules)
  codes = np.zeros((len(images), grid, grid), np.int32)
  with sharding.mesh_and_rules(mesh, rules):
    for start, end in _batches(len(images), batch_size):
      batch, valid = dvae_encode.pad_batch({"image": np.stack(images[start:end])}, batch_size, image_size)
      codes[start:end] = np.asarray(step(params, batch, valid)[0])[:end - start]
  np.save(output, codes)
  with open(_files_list_path(output), "w", encoding="utf-8") as f:
    f.write("".join(f"{path}\n" for path in encoded))
  return codes, encoded, skipped, image_size


def _short_reason(error):
  """An exception's first line without TF's op decorations ({{function_node ...}}, [Op:...])."""
  text = str(getattr(error, "message", None) or error).strip()
  text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*", "", text.splitlines()[0] if text else "").strip()
  return (text or type(error).__name__)[:200]


def _files_list_path(output):
  return (output[:-len(".npy")] if output.endswith(".npy") else output) + ".files.txt"


def _describe(skipped, limit=10):
  shown = "; ".join(f"{path}: {reason}" for path, reason in list(skipped.items())[:limit])
  return shown + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")


# ----------------------------------------------------------------------------- decode

def load_codes(path, vocab_size):
  """int32 [N, h, w] codes from a .npy file, checked against the dVAE's vocab size."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise DataError(f"--codes={path}: no such file")
  with open(path, "rb") as f:
    if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
      raise DataError(f"--codes={path}: not a numpy .npy file (expected the int32 [N, h, w] codes "
                      "`encode` writes)")
  try:
    codes = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f"--codes={path}: unreadable .npy file ({_short_reason(e)})") from e
  if not isinstance(codes, np.ndarray) or codes.dtype.kind not in "iu":
    raise DataError(f"--codes={path}: dtype {getattr(codes, 'dtype', type(codes).__name__)}, expected "
                    "integer codes (int32 [N, h, w] from `encode`)")
  if codes.ndim != 3 or 0 in codes.shape:
    raise DataError(f"--codes={path}: shape {codes.shape}, expected [N, h, w] with N, h, w ≥ 1")
  low, high = int(codes.min()), int(codes.max())
  if low < 0 or high >= vocab_size:
    raise DataError(f"--codes={path}: codes range over [{low}, {high}], but the dVAE's vocab has "
                    f"{vocab_size} codes (0 … {vocab_size - 1})")
  return codes.astype(np.int32)


def decode_codes(checkpoint_dir, codes_path, output_dir, batch_size=32, dtype=""):
  """Decodes every grid of a codes file to a PNG in `output_dir`; returns the PNG paths."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.models import dvae  # pylint: disable=g-import-not-at-top
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  # The codes are checked against model.json first: a bad file fails before any model loads.
  _require_checkpoint(checkpoint_dir)
  codes = load_codes(codes_path, checkpoint.load_model_config(checkpoint_dir, kind=dvae.KIND)["vocab_size"])
  model, params, shardings, mesh, rules, _ = _single_device_dvae(checkpoint_dir, "decoder", dtype)

  @jax.jit
  def decode(params, tokens):
    stats = model.apply({"params": params}, tokens, method=dvae.DVAE.decode_tokens)
    return jax.numpy.round(dvae.reconstruct_pixels(stats) * 255).astype(jax.numpy.uint8)

  os.makedirs(output_dir, exist_ok=True)
  width = max(5, len(str(len(codes) - 1)))
  paths = []
  with sharding.mesh_and_rules(mesh, rules):
    for start, end in _batches(len(codes), batch_size):
      batch = np.zeros((batch_size,) + codes.shape[1:], np.int32)
      batch[:end - start] = codes[start:end]
      images = np.asarray(decode(params, jax.device_put(batch, mesh.devices.flat[0])))
      for i in range(end - start):
        path = os.path.join(output_dir, f"{start + i:0{width}d}.png")
        Image.fromarray(images[i]).save(path)
        paths.append(path)
  return paths


# ----------------------------------------------------------------------------- command line

def define_flags():
  """Defined only when run as a program, so importing the functions above defines no flags."""
  flags.DEFINE_string("checkpoint", None, "Exported dVAE directory (params/ + model.json).")
  flags.DEFINE_list("images", [], "encode: image files and/or directories (comma-separated).")
  flags.DEFINE_string("codes", None, "decode: int32 [N, h, w] codes (.npy) written by `encode`.")
  flags.DEFINE_string("output", None, "encode: the codes .npy file to write; decode: a directory for PNGs.")
  flags.DEFINE_integer("image_size", None, "encode: the square size images are cropped and resized to "
                       "(default: the size the dVAE was trained at, from its model.json; 256 if it "
                       "records none, as converted OpenAI weights).", lower_bound=1)
  flags.DEFINE_integer("batch_size", 32, "Images (or code grids) per model call.", lower_bound=1)
  flags.DEFINE_string("dtype", "", "Compute dtype override, e.g. float32 ('' = as exported).")
  flags.mark_flags_as_required(["checkpoint", "output"])


def _error(message):
  sys.exit(f"{PROGRAM}: error: {message}")


def main(argv):
  args = flags.FLAGS
  if not args["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the summary below says what happened; orbax's INFO is noise
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    _error(f"expected one subcommand, {' or '.join(SUBCOMMANDS)}, got {argv[1:] or 'none'} (see --help)")
  try:
    if argv[1] == "encode":
      if not args.images:
        _error("encode needs --images (image files and/or directories)")
      codes, encoded, skipped, image_size = encode_images(args.checkpoint, args.images, args.output,
                                                          args.image_size, args.batch_size, args.dtype)
      print(f"Encoded {len(encoded)} image(s) at {image_size} px -> {args.output}: int32 "
            f"{list(codes.shape)} codes (rows listed in {_files_list_path(args.output)})")
      if skipped:
        print(f"Skipped {len(skipped)} unreadable image(s): {_describe(skipped)}")
    else:
      if not args.codes:
        _error("decode needs --codes (a .npy file written by encode)")
      paths = decode_codes(args.checkpoint, args.codes, args.output, args.batch_size, args.dtype)
      print(f"Decoded {len(paths)} code grid(s) from {args.codes} -> {len(paths)} PNG(s) in {args.output}")
  except (ConfigError, DataError) as e:
    _error(e)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
