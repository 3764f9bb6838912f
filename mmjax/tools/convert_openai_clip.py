r"""Convert OpenAI CLIP ViT weights (or open_clip ViT checkpoints) to an exported mmjax CLIP model.

  python -m mmjax.tools.convert_openai_clip --input=ViT-B-32.pt --output=DIR

--input is any of: OpenAI's released TorchScript archive (what `clip.load` downloads; read with
`torch.jit.load(...).state_dict()`), a saved `state_dict()` of OpenAI's / clip-anytorch's `CLIP`, or an
open_clip checkpoint of the same architecture (a bare state dict, or a training checkpoint
{"state_dict": {"module.…": …}, …}: the wrapper and the `module.` prefix are removed). Only ViT
image towers convert (not the ResNets), and only the standard text tower (open_clip models whose
text tower lives under `text.` are refused).

The architecture is read from the weights: vision width, patch size and image size from
`visual.conv1.weight` and `visual.positional_embedding`, layer counts from the
`…transformer.resblocks.N.` keys, MLP widths from `c_fc`, text width/vocab from
`token_embedding.weight`, context from `positional_embedding`, embed_dim from the projections.
Two things cannot be read from weights and have flags: heads (default width // 64, OpenAI's rule;
open_clip's ViT-H/g use 80/88-wide heads) and the MLP activation (OpenAI's models use quick_gelu;
open_clip models without "-quickgelu" in their name, e.g. the LAION ViT-B-32, use --activation=gelu).
Every key the mmjax model expects must be present with the expected shape and no key may be left
over (apart from OpenAI's non-weight entries input_resolution/context_length/vocab_size and
attention masks, which are dropped and counted), else the tool exits naming the key.

Key mapping (OpenAI → mmjax; blocks_N becomes one stacked `blocks` with --scan_layers; W = width,
H = heads, D = W/H; torch Linear weights are [out, in], mmjax kernels [in, out]):
  visual.conv1.weight [W,3,p,p]               → visual/patch_embedding/kernel [p,p,3,W]
  visual.class_embedding, .positional_embedding → visual/class_embedding, positional_embedding
  visual.ln_pre / ln_post .{weight,bias}       → visual/ln_pre / ln_post /{scale,bias}
  visual.proj [W,E]                             → visual/projection [W,E]
  token_embedding.weight [V,W]                  → text/token_embedding/embedding
  positional_embedding [C,W]                    → text/positional_embedding
  ln_final.{weight,bias}                        → text/ln_final/{scale,bias}
  text_projection [W,E]                         → text/projection
  logit_scale                                   → logit_scale
  {visual.,}transformer.resblocks.N. (→ {visual,text}/transformer/blocks_N/):
    ln_1 / ln_2 .{weight,bias}                  → ln_1 / ln_2 /{scale,bias}
    attn.in_proj_weight [3W,W] (q; k; v rows)   → attn/{query,key,value}/kernel [W,H,D]
    attn.in_proj_bias [3W]                      → attn/{query,key,value}/bias [H,D]
    attn.out_proj.{weight [W,W], bias}          → attn/out/{kernel [H,D,W], bias}
    mlp.c_fc / mlp.c_proj .{weight,bias}        → mlp/fc / mlp/proj /{kernel,bias}

Load the result with `mmjax.train.checkpoint.load_model(DIR, kind="clip")` and
`mmjax.models.clip.from_model_config`.
"""

import math
import os
import re

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import cli
from mmjax.errors import DataError
from mmjax.models import clip, layers
from mmjax.tools import torch_weights

# Entries of OpenAI's TorchScript state dicts that are not weights (OpenAI's build_model drops them too).
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
_QKV = ("query", "key", "value")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_TOP_LEVEL = {
    ("visual", "patch_embedding", "kernel"): "visual.conv1.weight",
    ("visual", "class_embedding"): "visual.class_embedding",
    ("visual", "positional_embedding"): "visual.positional_embedding",
    ("visual", "projection"): "visual.proj",
    ("text", "token_embedding", "embedding"): "token_embedding.weight",
    ("text", "positional_embedding"): "positional_embedding",
    ("text", "projection"): "text_projection",
    ("logit_scale",): "logit_scale",
}


def read_checkpoint(path):
  """{OpenAI key: float32 numpy array} from a CLIP TorchScript archive, state dict or open_clip checkpoint."""
  loaded = torch_weights.load_torch_object(
      path, module_hint="install the package that defines the model (OpenAI's clip or open_clip) or "
      "convert its state_dict() instead")
  if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
    logging.info("%s: a training checkpoint; converting its 'state_dict' entry", path)
    loaded = loaded["state_dict"]
  state = torch_weights.tensors_to_numpy(
      loaded, path, expected="a CLIP state_dict, TorchScript archive or open_clip checkpoint")
  return prepare_state(state, path)


def prepare_state(state, source="checkpoint"):
  """OpenAI key names: strips a `module.` prefix (DataParallel/DDP saves), drops non-weight entries."""
  if state and all(key.startswith("module.") for key in state):
    state = {key[len("module."):]: value for key, value in state.items()}
  if any(key.startswith("visual.layer1.") or key.startswith("visual.attnpool.") for key in state):
    raise DataError(f"{source}: a ResNet CLIP (visual.layer1 / visual.attnpool keys); only ViT models convert")
  if "token_embedding.weight" not in state and any(key.startswith("text.") for key in state):
    raise DataError(f"{source}: the text tower is under 'text.' (open_clip's CustomTextCLIP); only the "
                    "standard CLIP text transformer converts")
  dropped = sorted(key for key in state if key in NON_WEIGHT_KEYS or key.split(".")[-1] == "attn_mask")
  if dropped:
    logging.info("%s: dropping %d non-weight entries: %s", source, len(dropped), ", ".join(dropped))
  return {key: value for key, value in state.items() if key not in dropped}


def _tensor(state, key, ndim, source):
  if key not in state:
    raise DataError(f"{source}: missing key {key!r}; not a CLIP ViT checkpoint, or an incomplete one")
  if state[key].ndim != ndim:
    raise DataError(f"{source}: key {key!r} has shape {state[key].shape}, expected {ndim} dimensions")
  return state[key]


def _layer_count(state, prefix, source):
  pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
  indices = {int(m.group(1)) for m in map(pattern.match, state) if m}
  if not indices:
    raise DataError(f"{source}: no '{prefix}transformer.resblocks.N.*' keys")
  return max(indices) + 1  # a missing block in between is reported as a missing key


def _heads(width, heads, tower, source):
  if heads:
    if width % heads:
      raise DataError(f"{source}: {tower} width {width} is not divisible by --{tower}_heads={heads}")
    return heads
  if width % 64:
    raise DataError(f"{source}: {tower} width {width} is not a multiple of 64; give --{tower}_heads")
  return width // 64


def infer_fields(state, source="checkpoint", vision_heads=0, text_heads=0):
  """CLIP module fields read from the shapes and key names of an OpenAI-named state dict."""
  conv = _tensor(state, "visual.conv1.weight", 4, source)
  vision_width, channels, patch_size, patch_width = conv.shape
  if channels != 3 or patch_size != patch_width:
    raise DataError(f"{source}: visual.conv1.weight has shape {conv.shape}, expected [width, 3, patch, patch]")
  positions = _tensor(state, "visual.positional_embedding", 2, source).shape[0]
  grid = math.isqrt(positions - 1)
  if grid * grid + 1 != positions:
    raise DataError(f"{source}: visual.positional_embedding has {positions} rows, expected grid² + 1 "
                    "(a class token and a square grid of patches)")
  embed_dim = _tensor(state, "visual.proj", 2, source).shape[1]
  text_embed_dim = _tensor(state, "text_projection", 2, source).shape[1]
  if text_embed_dim != embed_dim:
    raise DataError(f"{source}: visual.proj and text_projection disagree on embed_dim: "
                    f"{embed_dim} vs {text_embed_dim}")
  vocab_size, text_width = _tensor(state, "token_embedding.weight", 2, source).shape
  return {
      "embed_dim": embed_dim,
      "image_size": grid * patch_size,
      "patch_size": patch_size,
      "vision_width": vision_width,
      "vision_layers": _layer_count(state, "visual.", source),
      "vision_heads": _heads(vision_width, vision_heads, "vision", source),
      "vision_mlp_dim": _tensor(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2, source).shape[0],
      "context_length": _tensor(state, "positional_embedding", 2, source).shape[0],
      "vocab_size": vocab_size,
      "text_width": text_width,
      "text_layers": _layer_count(state, "", source),
      "text_heads": _heads(text_width, text_heads, "text", source),
      "text_mlp_dim": _tensor(state, "transformer.resblocks.0.mlp.c_fc.weight", 2, source).shape[0],
  }


def torch_key(names):
  """OpenAI state-dict key of an (unscanned) mmjax param path, e.g.
  ('text', 'transformer', 'blocks_3', 'attn', 'key', 'bias') → 'transformer.resblocks.3.attn.in_proj_bias'."""
  names = tuple(names)
  if names in _TOP_LEVEL:
    return _TOP_LEVEL[names]
  tower, *modules, leaf = names
  prefix = "visual." if tower == "visual" else ""
  if modules[0] != "transformer":  # ln_pre, ln_post, ln_final
    return f"{prefix}{modules[0]}.{_TORCH_LEAF[leaf]}"
  block = int(modules[1].rpartition("_")[2])
  base = f"{prefix}transformer.resblocks.{block}."
  if modules[2] == "attn":
    if modules[3] in _QKV:
      return base + ("attn.in_proj_weight" if leaf == "kernel" else "attn.in_proj_bias")
    return f"{base}attn.out_proj.{_TORCH_LEAF[leaf]}"
  if modules[2] == "mlp":
    return f"{base}mlp.{'c_fc' if modules[3] == 'fc' else 'c_proj'}.{_TORCH_LEAF[leaf]}"
  return f"{base}{modules[2]}.{_TORCH_LEAF[leaf]}"  # ln_1, ln_2


def _torch_layout(names, shape):
  """(the torch tensor's expected shape, torch array → mmjax array) for an mmjax param of `shape`."""
  leaf, module = names[-1], (names[-2] if len(names) > 1 else None)
  if module in _QKV:
    part = _QKV.index(module)
    if leaf == "kernel":
      width = shape[0]
      return (3 * width, width), lambda w: w[part * width:(part + 1) * width].T.reshape(shape)
    size = shape[0] * shape[1]
    return (3 * size,), lambda b: b[part * size:(part + 1) * size].reshape(shape)
  if module == "out" and leaf == "kernel":  # [H, D, W] ← out_proj.weight [W, H·D]
    return (shape[2], shape[0] * shape[1]), lambda w: w.T.reshape(shape)
  if module in ("fc", "proj") and leaf == "kernel":
    return shape[::-1], lambda w: w.T
  if module == "patch_embedding":  # HWIO ← OIHW
    return (shape[3], shape[2], shape[0], shape[1]), lambda w: w.transpose(2, 3, 1, 0)
  return tuple(shape), lambda x: x


def key_plan(state, abstract, source="checkpoint"):
  """[(mmjax path, torch key, torch → mmjax function)] for every param of the unscanned `abstract`
  tree, after checking that every key is present with the expected shape and none is left over."""
  plan, used = [], set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = tuple(entry.key for entry in path)
    key = torch_key(names)
    expected, to_mmjax = _torch_layout(names, tuple(leaf.shape))
    if key not in state:
      raise DataError(f"{source}: missing key {key!r} (mmjax {'/'.join(names)}, torch shape {expected})")
    if tuple(state[key].shape) != expected:
      raise DataError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {expected}")
    plan.append((names, key, to_mmjax))
    used.add(key)
  left_over = sorted(set(state) - used)
  if left_over:
    shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in left_over[:5])
    raise DataError(f"{source}: {len(left_over)} key(s) the CLIP ViT does not use: {shapes}"
                    + (" ..." if len(left_over) > 5 else "")
                    + " (LayerScale, extra norms, attention pooling and logit_bias are not supported)")
  return plan


def convert_params(state, abstract, source="checkpoint"):
  """OpenAI-named state dict → unscanned mmjax params (numpy float32), following `key_plan`."""
  converted = {}
  for names, key, to_mmjax in key_plan(state, abstract, source):
    node = converted
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.array(to_mmjax(state[key]), np.float32, order="C")  # keeps logit_scale 0-d
  return converted


def convert(state, source="checkpoint", *, activation="quick_gelu", vision_heads=0, text_heads=0,
            dtype="float32", scan_layers=False):
  """(params, model_config dict) from an OpenAI-named CLIP state dict (see `prepare_state`)."""
  if activation not in layers.ACTIVATIONS:
    raise DataError(f"activation={activation!r}: expected one of {layers.ACTIVATIONS}")
  fields = infer_fields(state, source, vision_heads, text_heads)
  model = clip.CLIP(activation=activation, dtype=jnp.dtype(dtype), scan_layers=False, **fields)
  params = convert_params(state, clip.abstract_params(model), source)
  if scan_layers:
    params = layers.stack_layers(params)
    model = model.clone(scan_layers=True)
  return params, clip.model_config(model, source="openai-clip")


def define_flags():
  """Defined only when run as a program, so importing the conversion functions defines no flags."""
  flags.DEFINE_string("input", None, "CLIP ViT weights: OpenAI's TorchScript archive (ViT-B-32.pt …), a saved "
                      "state_dict, or an open_clip checkpoint.")
  flags.DEFINE_string("output", None, "Directory for the exported model (params/ + model.json).")
  flags.DEFINE_enum("activation", "quick_gelu", list(layers.ACTIVATIONS),
                    "MLP activation: quick_gelu for OpenAI's models (and open_clip's *-quickgelu), gelu for "
                    "other open_clip models. Weights cannot tell.")
  flags.DEFINE_integer("vision_heads", 0, "Vision attention heads (0 = vision width // 64).")
  flags.DEFINE_integer("text_heads", 0, "Text attention heads (0 = text width // 64).")
  flags.DEFINE_bool("scan_layers", False, "Store the params in the scanned layout (one stacked 'blocks' per "
                    "tower) and record scan_layers=True.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype recorded in model.json (params are always stored as float32).")
  flags.DEFINE_bool("overwrite", False, "Replace an exported model already in --output.")
  flags.mark_flags_as_required(["input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  if os.path.exists(os.path.join(args.output, checkpoint.MODEL_JSON)) and not args.overwrite:
    raise app.UsageError(f"--output={args.output} already holds an exported model; pass --overwrite to "
                         "replace it")
  try:
    state = read_checkpoint(args.input)
    params, config = convert(state, args.input, activation=args.activation, vision_heads=args.vision_heads,
                             text_heads=args.text_heads, dtype=args.dtype, scan_layers=args.scan_layers)
  except DataError as e:
    raise SystemExit(f"mmjax.tools.convert_openai_clip: error: {e}") from None
  checkpoint.save_model(args.output, params, config)
  count = sum(x.size for x in jax.tree.leaves(params))
  shown = ("image_size", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers",
           "embed_dim", "activation", "scan_layers")
  print(f"wrote {args.output}: {({k: config[k] for k in shown})} ({count:,} parameters)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
