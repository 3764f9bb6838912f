r"""Convert OpenAI's released dVAE weights (`dall_e` encoder.pkl / decoder.pkl) to an exported mmjax model.

  python -m mmjax.tools.convert_openai_dvae --encoder=encoder.pkl --decoder=decoder.pkl --output=DIR

Each file is either a pickled `dall_e.Encoder` / `dall_e.Decoder` module (what OpenAI released and
`dall_e.load_model` reads; unpickling it runs code, so convert only files you trust, and it needs the
`dall_e` package importable) or a saved `state_dict()`. The architecture (n_hid, n_blk_per_group,
group_count, vocab_size, n_init, channels) is read from the tensor shapes and key names; then every
key the mmjax module expects must be present with the expected shape and no key may be left over,
else the tool exits naming the key and shapes.

Given both files the output holds the full DVAE ({"encoder", "decoder"} params). Given one, it holds
that half only (`"parts"` in model.json says which): enough for `DVAE.encode` or `DVAE.decode`; the
other half's fields keep their defaults. Load with
`mmjax.train.checkpoint.load_model(DIR, kind="dvae")` and `mmjax.models.dvae.from_model_config`.

Key mapping (dall_e OIHW `w`/`b` → mmjax HWIO `kernel`/`bias`):
  blocks.input.{w,b}                          → {part}/input/{kernel,bias}
  blocks.group_G.block_B.id_path.{w,b}        → {part}/group_G_block_B/id_path/{kernel,bias}
  blocks.group_G.block_B.res_path.conv_K.{w,b} → {part}/group_G_block_B/conv_K/{kernel,bias}
  blocks.output.conv.{w,b}                    → {part}/output/{kernel,bias}
"""

import os
import re

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from mmjax import cli
from mmjax.errors import DataError
from mmjax.models import dvae
from mmjax.tools import torch_weights

_BLOCK_KEY = re.compile(r"blocks\.group_(\d+)\.block_(\d+)\.")


def load_state_dict(path):
  """{key: float32 numpy array} from a pickled dall_e module or a saved state_dict; DataError otherwise."""
  return torch_weights.load_state_dict(
      path, expected="a dall_e Encoder/Decoder module or a state_dict",
      module_hint="install OpenAI's dall_e package or convert a state_dict instead")


def _tensor(state, key, ndim, source):
  if key not in state:
    raise DataError(f"{source}: missing key {key!r}")
  if state[key].ndim != ndim:
    raise DataError(f"{source}: key {key!r} has shape {state[key].shape}, expected {ndim} dimensions")
  return state[key]


def _group_layout(state, source):
  """(group_count, n_blk_per_group) from the `blocks.group_G.block_B.` key names."""
  blocks = {(int(g), int(b)) for g, b in (m.groups() for m in map(_BLOCK_KEY.match, state) if m)}
  if not blocks:
    raise DataError(f"{source}: no 'blocks.group_G.block_B.*' keys; not a dall_e encoder/decoder")
  group_count = max(g for g, _ in blocks)
  n_blk_per_group = max(b for g, b in blocks if g == 1)
  return group_count, n_blk_per_group


def infer_encoder_fields(state, source="encoder"):
  """DVAE fields read from an encoder state_dict's shapes and key names."""
  input_w = _tensor(state, "blocks.input.w", 4, source)
  if input_w.shape[2:] != (7, 7):
    raise DataError(f"{source}: blocks.input.w has shape {input_w.shape}, expected a 7×7 kernel "
                    "[n_hid, channels, 7, 7] (is this a decoder file?)")
  output_w = _tensor(state, "blocks.output.conv.w", 4, source)
  group_count, n_blk_per_group = _group_layout(state, source)
  return {"n_hid": input_w.shape[0], "input_channels": input_w.shape[1], "vocab_size": output_w.shape[0],
          "group_count": group_count, "n_blk_per_group": n_blk_per_group}


def infer_decoder_fields(state, source="decoder"):
  """DVAE fields read from a decoder state_dict's shapes and key names."""
  input_w = _tensor(state, "blocks.input.w", 4, source)
  if input_w.shape[2:] != (1, 1):
    raise DataError(f"{source}: blocks.input.w has shape {input_w.shape}, expected a 1×1 kernel "
                    "[n_init, vocab_size, 1, 1] (is this an encoder file?)")
  output_w = _tensor(state, "blocks.output.conv.w", 4, source)
  if output_w.shape[0] % 2:
    raise DataError(f"{source}: blocks.output.conv.w has shape {output_w.shape}, expected an even number "
                    "of output channels (location and log-scale per image channel)")
  group_count, n_blk_per_group = _group_layout(state, source)
  return {"n_hid": output_w.shape[1], "output_channels": output_w.shape[0] // 2, "n_init": input_w.shape[0],
          "vocab_size": input_w.shape[1], "group_count": group_count, "n_blk_per_group": n_blk_per_group}


def torch_key(path):
  """mmjax param path within a part, e.g. ('group_1_block_2', 'conv_3', 'kernel') → dall_e key."""
  *modules, leaf = path
  suffix = {"kernel": "w", "bias": "b"}[leaf]
  if modules == ["input"]:
    names = ["blocks", "input"]
  elif modules == ["output"]:
    names = ["blocks", "output", "conv"]
  else:
    group, block = re.fullmatch(r"group_(\d+)_block_(\d+)", modules[0]).groups()
    conv = modules[1]
    names = ["blocks", f"group_{group}", f"block_{block}"] + (["id_path"] if conv == "id_path"
                                                               else ["res_path", conv])
  return ".".join(names + [suffix])


def abstract_params(model):
  """The model's param tree as ShapeDtypeStructs (no allocation)."""
  size = 2 ** (model.group_count - 1)
  images = jnp.zeros((1, size, size, model.input_channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, temperature=1.0, rng=None,
                                                deterministic=True))
  return meta.unbox(variables["params"])


def convert_part(state, abstract_part, source):
  """dall_e state_dict → mmjax params for one part, checking every key and shape, none left over."""
  converted, used = {}, set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_part)[0]:
    names = tuple(entry.key for entry in path)
    key = torch_key(names)
    if key not in state:
      raise DataError(f"{source}: missing key {key!r} (mmjax {'/'.join(names)}, shape {leaf.shape})")
    value = state[key]
    if value.ndim == 4:  # OIHW → HWIO
      value = value.transpose(2, 3, 1, 0)
    if value.shape != leaf.shape:
      expected = leaf.shape if len(leaf.shape) != 4 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
      raise DataError(f"{source}: key {key!r} has shape {state[key].shape}, expected {expected}")
    node = converted
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.asarray(value, np.float32)
    used.add(key)
  left_over = sorted(set(state) - used)
  if left_over:
    shapes = ", ".join(f"{k} {state[k].shape}" for k in left_over[:5])
    raise DataError(f"{source}: {len(left_over)} key(s) the dVAE does not use: {shapes}"
                    + (" ..." if len(left_over) > 5 else ""))
  return converted


def convert(encoder_state=None, decoder_state=None, dtype="float32", encoder_source="encoder",
            decoder_source="decoder"):
  """(params, model_config dict) from dall_e state_dicts; either may be None (that part is left out)."""
  if encoder_state is None and decoder_state is None:
    raise DataError("nothing to convert: give an encoder, a decoder or both")
  fields, parts = {}, []
  for part, state, infer, source in (("encoder", encoder_state, infer_encoder_fields, encoder_source),
                                     ("decoder", decoder_state, infer_decoder_fields, decoder_source)):
    if state is None:
      continue
    parts.append(part)
    for name, value in infer(state, source).items():
      if name in fields and fields[name] != value:
        raise DataError(f"{encoder_source} and {decoder_source} disagree on {name}: "
                        f"{fields[name]} vs {value}")
      fields[name] = value
  model = dvae.DVAE(dtype=jnp.dtype(dtype), **fields)
  abstract = abstract_params(model)
  params = {part: convert_part(state, abstract[part], source)
            for part, state, source in (("encoder", encoder_state, encoder_source),
                                        ("decoder", decoder_state, decoder_source)) if state is not None}
  return params, dvae.model_config(model, parts=parts, source="openai-dall_e")


def define_flags():
  """Defined only when run as a program, so importing the conversion functions defines no flags."""
  flags.DEFINE_string("encoder", None, "OpenAI dall_e encoder: pickled module (encoder.pkl) or a saved "
                      "state_dict (.pt/.pkl).")
  flags.DEFINE_string("decoder", None, "OpenAI dall_e decoder: pickled module (decoder.pkl) or a saved "
                      "state_dict (.pt/.pkl).")
  flags.DEFINE_string("output", None, "Directory for the exported model (params/ + model.json).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype recorded in model.json (params are always stored as float32).")
  flags.DEFINE_bool("overwrite", False, "Replace an exported model already in --output.")
  flags.mark_flag_as_required("output")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  if not args.encoder and not args.decoder:
    raise app.UsageError("give --encoder, --decoder or both")
  output = args.output
  if os.path.exists(os.path.join(output, checkpoint.MODEL_JSON)) and not args.overwrite:
    raise app.UsageError(f"--output={output} already holds an exported model; pass --overwrite to replace it")
  try:
    encoder = load_state_dict(args.encoder) if args.encoder else None
    decoder = load_state_dict(args.decoder) if args.decoder else None
    params, config = convert(encoder, decoder, args.dtype, args.encoder, args.decoder)
  except DataError as e:
    raise SystemExit(f"mmjax.tools.convert_openai_dvae: error: {e}") from None
  checkpoint.save_model(output, params, config)
  count = sum(x.size for x in jax.tree.leaves(params))
  fields = {k: config[k] for k in ("n_hid", "n_blk_per_group", "group_count", "vocab_size")}
  print(f"wrote {output}: parts={config['parts']} {fields} ({count:,} parameters)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
