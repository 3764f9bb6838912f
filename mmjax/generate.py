r"""Text → image with DALL·E: sample image codes with the KV cache, decode them with the dVAE, rerank with CLIP.

  python -m mmjax.generate --dalle=DIR --dvae=DIR --clip=DIR \
      --prompt="a red circle above a blue square" --num_candidates=64 --top=8 --output=grid.png

--dalle, --dvae and --clip are exported models (params/ + model.json; `checkpoint.load_model`).
--prompt may repeat; --prompts_file reads one caption per line. Writes --output (a PNG with each
caption above its row of the --top kept candidates) and --json (default: the PNG's path with .json):
captions, settings, and every candidate's seed and CLIP score. Without --clip nothing is reranked:
the first --top candidates are kept.

Sampling (`sample_image_tokens`): one jitted call per batch of candidates. The caption's T text
tokens are prefilled in one `Dalle.decode` call, then a `lax.scan` adds the N image codes one at a
time against the KV cache. Each code is drawn from the image logits only (`logits[..., text_rows:]`)
after temperature, top-k and top-p (nucleus) filtering; temperature 0 is argmax. With
--guidance_scale s (classifier-free guidance) every candidate runs twice in the same batch, with its
caption and with the all-pad caption (every text position its own pad id), interleaved so both rows
sit on the same device, and samples from uncond + s·(cond − uncond). The all-pad caption means
"no caption" only to a transformer trained with `config.caption_dropout` > 0. --negative_prompt
replaces it with a caption to steer away from (repeat it and candidates cycle through them), e.g.
the prompt with its shape word swapped (measured on the shapes set in README); unlike the all-pad
caption it needs no caption dropout in training.

Seeds: candidate j of prompt p draws its codes from `jax.random.key(seed + p·num_candidates + j)`
folded with the code's position, so a candidate is reproduced by its recorded seed alone, whatever
the batch it ran in. Batches are split over the devices by the `activation_batch` logical rule.

The DALL·E tokenizer: --tokenizer, else the export's tokenizer.json (`zeroshot.save_tokenizer`'s
record), else <dalle>/../tokenizer/spm.model (a training workdir's tokenizer). The CLIP export
brings its own (`zeroshot.load`).

API: `sample_image_tokens` (codes for caption rows; `decoding_model` first for speed),
`decode_images` (dVAE), `clip_scores` + `rerank`, `Generator(dalle, dvae, clip).generate(...)` →
`Samples`, `write_outputs`; `training_samples` is the DALL·E trainer's sample-grid hook.
"""

import dataclasses
import functools
import json
import os
import shlex
import sys
import textwrap
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding
from mmjax.configs import common
from mmjax.errors import ConfigError, DataError
from mmjax.models import dalle, dvae, layers

RULES = common.DEFAULT_LOGICAL_AXIS_RULES


# ----------------------------------------------------------------------------- filtering and sampling

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How image codes are drawn. Hashable: the jitted sampler is compiled once per settings."""
  temperature: float = 1.0               # 0 = argmax
  top_k: int = 0                         # keep the k most likely codes (0 = all)
  top_p: float = 1.0                     # keep the smallest set with probability ≥ top_p (1 = all)
  guidance_scale: Optional[float] = None  # classifier-free guidance; None = conditional rows only

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ConfigError(f"--temperature={self.temperature}: expected ≥ 0 (0 samples the argmax)")
    if self.top_k < 0:
      raise ConfigError(f"--top_k={self.top_k}: expected ≥ 0 (0 keeps every code)")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"--top_p={self.top_p}: expected 0 < top_p ≤ 1 (1 keeps every code)")


def filter_top_k(logits, k):
  """logits [..., V] with everything below the k-th largest set to −inf (k = 0 or ≥ V: unchanged).
  Codes tied with the k-th largest are all kept."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits, p):
  """Nucleus filtering: keeps the most likely codes until their probability reaches p (at least one:
  a code is kept when the mass of the codes ranked above it is < p); the rest become −inf."""
  if p >= 1:
    return logits
  ranked = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(ranked, axis=-1)
  kept = (jnp.cumsum(probs, axis=-1) - probs) < p
  # The smallest kept logit is the cut; comparing against it avoids scattering back from sort order.
  cut = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cut, -jnp.inf, logits)


def sample_logits(logits, keys, settings):
  """int32 [B] codes from logits [B, V] and one key per row: temperature → top-k → top-p → draw."""
  if settings.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_top_p(filter_top_k(logits / settings.temperature, settings.top_k), settings.top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def candidate_keys(seeds, impl="threefry2x32"):
  """One PRNG key per candidate from integer seeds [B]. threefry's bits depend only on the key, so a
  candidate's codes do not depend on its batch or its devices."""
  return jax.vmap(functools.partial(jax.random.key, impl=impl))(jnp.asarray(seeds, jnp.uint32))


# ----------------------------------------------------------------------------- incremental decoding

def _sample(params, text_tokens, negative_tokens, keys, guidance_scale, *, model, settings, return_logits):
  batch, text_length = text_tokens.shape
  guided = settings.guidance_scale is not None
  rows = text_tokens
  if guided:  # [cond_0, neg_0, cond_1, ...]: a candidate's two rows land on the same device
    rows = jnp.stack([text_tokens, negative_tokens], axis=1).reshape(2 * batch, text_length)

  def image_logits(logits):  # the last position's image part; guided: combined per candidate
    logits = logits[:, -1, model.text_rows:]
    if not guided:
      return logits
    cond, negative = logits[0::2], logits[1::2]
    return negative + guidance_scale * (cond - negative)

  def draw(logits, position):
    return sample_logits(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, position), settings)

  def step(carry, position):
    cache, logits = carry
    codes = draw(logits, position)
    fed = jnp.repeat(codes, 2) if guided else codes
    next_logits, cache = dalle.decode_step(model, params, cache, fed[:, None], text_length + position)
    return (cache, image_logits(next_logits)), (codes, logits if return_logits else None)

  cache = dalle.init_cache(model, rows.shape[0])
  prefill, cache = dalle.decode_step(model, params, cache, rows, 0)
  # Image codes 0 … N−2 are fed back; the last one is only drawn (its logits would predict nothing).
  (_, last), (codes, seen) = jax.lax.scan(step, (cache, image_logits(prefill)),
                                          jnp.arange(model.image_length - 1, dtype=jnp.int32))
  codes = jnp.concatenate([codes.T, draw(last, model.image_length - 1)[:, None]], axis=1)
  if not return_logits:
    return codes
  return codes, jnp.concatenate([seen, last[None]]).transpose(1, 0, 2)


@functools.lru_cache(maxsize=16)
def _sampler(model, settings, return_logits, mesh, rules):
  # One jit per mesh and rules (the logical constraints inside bind to them at trace time) and per
  # settings, except the guidance scale: it is an argument, so changing it does not recompile.
  del mesh, rules
  return jax.jit(functools.partial(_sample, model=model, settings=settings, return_logits=return_logits))


def sample_image_tokens(model, params, text_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0,
                        guidance_scale=None, negative_tokens=None, mesh=None, rules=RULES, return_logits=False):
  """Image codes int32 [B, N] (N = grid_size², raster order) for text_tokens [B, T] ("dalle" layout).

  rng: one PRNG key (split into one per row) or a key array [B] (`candidate_keys(seeds)`).
  guidance_scale: None for plain conditional sampling; s for neg + s·(cond − neg), where neg are the
    logits under negative_tokens [B, T] (default: the all-pad caption, i.e. classifier-free guidance).
  mesh: rows are split over the mesh axes of the `activation_batch` rule (B must divide); params
    keep whatever sharding they have. return_logits: also the f32 image logits [B, N, image_vocab]
    each code was drawn from (guided when guiding; before temperature and filtering).
  Works with either layer layout; `decoding_model` gives the faster one. Compiled once per model,
  settings and mesh (cached), so repeated calls (a trainer's sample grids) only run.
  """
  settings = SamplingSettings(float(temperature), int(top_k), float(top_p),
                              None if guidance_scale is None else float(guidance_scale))
  text_tokens = jnp.asarray(text_tokens, jnp.int32)
  batch = text_tokens.shape[0]
  if text_tokens.shape != (batch, model.text_length):
    raise ValueError(f"text_tokens of shape {text_tokens.shape}: expected [batch, text_length="
                     f"{model.text_length}]")
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    raise ValueError("rng: expected a typed PRNG key (jax.random.key) or a key array [B], not raw uint32 keys")
  keys = rng if rng.shape == (batch,) else jax.random.split(rng, batch)
  scale = jnp.float32(1.0 if guidance_scale is None else guidance_scale)
  if settings.guidance_scale is None:
    if negative_tokens is not None:
      raise ConfigError("negative captions are only used with guidance: set --guidance_scale")
  else:
    settings = dataclasses.replace(settings, guidance_scale=1.0)  # the compiled sampler's key: guided or not
    if negative_tokens is None:
      negative_tokens = dalle.unconditional_text(model, batch)
    negative_tokens = jnp.asarray(negative_tokens, jnp.int32)
    if negative_tokens.shape != text_tokens.shape:
      raise ValueError(f"negative_tokens of shape {negative_tokens.shape}: expected {text_tokens.shape}, "
                       "one negative caption per row of text_tokens")
  if mesh is None:
    return _sampler(model, settings, return_logits, None, None)(params, text_tokens, negative_tokens, keys, scale)
  rules = tuple(rules)
  shards = batch_shards(mesh, rules)
  if batch % shards:
    raise ConfigError(f"a batch of {batch} candidates does not split over the {shards} batch shards of "
                      f"the mesh {dict(mesh.shape)}: use a multiple of {shards} (--batch_size)")
  rows = sharding.batch_sharding(mesh, rules)
  with sharding.mesh_and_rules(mesh, rules):
    negative_tokens = None if negative_tokens is None else jax.device_put(negative_tokens, rows)
    return _sampler(model, settings, return_logits, mesh, rules)(
        params, jax.device_put(text_tokens, rows), negative_tokens, jax.device_put(keys, rows), scale)


def batch_shards(mesh, rules=RULES):
  """How many ways the batch is split: the product of the `activation_batch` rule's mesh axes."""
  return int(np.prod([mesh.shape[axis] for axis in sharding.batch_axes(rules)]))


# ----------------------------------------------------------------------------- dVAE decoding, CLIP scores

@functools.lru_cache(maxsize=4)
def _decoder(model, mesh, rules):
  del mesh, rules  # cache keys: the constraints bind to them when traced

  def decode(params, codes):
    stats = model.apply({"params": params}, codes, method=dvae.DVAE.decode_tokens)
    return jnp.round(dvae.reconstruct_pixels(stats) * 255).astype(jnp.uint8)
  return jax.jit(decode)


def decode_images(model, params, codes, grid_size, mesh=None, rules=RULES):
  """uint8 images [B, H, W, 3] from codes [B, grid_size²] (H = grid_size · 2^(group_count−1)); with a
  mesh, split over its batch axes like `sample_image_tokens`."""
  codes = jnp.reshape(codes, (-1, grid_size, grid_size))
  if mesh is None:
    return _decoder(model, None, None)(params, codes)
  with sharding.mesh_and_rules(mesh, rules):
    return _decoder(model, mesh, tuple(rules))(params, codes)


def clip_pixels(images, image_size):
  """uint8 [B, H, W, 3] → float32 CLIP inputs at image_size: resized as the CLIP pipeline resizes
  (`preprocess.resize_and_crop`) and mapped with the "clip" pixel map."""
  from mmjax.input_pipeline import preprocess  # pylint: disable=g-import-not-at-top  (TensorFlow)
  images = np.asarray(images)
  if images.shape[1:3] != (image_size, image_size):
    images = np.stack([preprocess.resize_and_crop(image, image_size).numpy() for image in images])
  return np.asarray(preprocess.map_pixels(images, "clip"))


def clip_scores(encoder, tokenizer, images, captions):
  """Cosine similarity [B] of each image with its own caption (one caption per image row).

  encoder: a `zeroshot.Encoder`; tokenizer: the CLIP's (sentencepiece or OpenAI BPE, "clip" layout).
  """
  unique = sorted(set(captions))
  texts = encoder.texts(tokenizer.tokenize(unique, "clip", encoder.model.context_length))
  image_embeddings = encoder.images(clip_pixels(images, encoder.model.image_size))
  rows = np.asarray([unique.index(c) for c in captions])
  return np.sum(image_embeddings * texts[rows], axis=-1)


def rerank(scores, top):
  """Indices [P, top] of each row's `top` highest scores [P, N], best first (ties: lower index first)."""
  return np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :top]


# ----------------------------------------------------------------------------- loading exports

def _param_init(model):
  text = jnp.zeros((1, model.text_length), jnp.int32)
  image = jnp.zeros((1, model.image_length), jnp.int32)
  return lambda: model.init(jax.random.key(0, impl="rbg"), text, image)["params"]


def load_dalle(directory, mesh, rules=RULES, dtype=None):
  """(Dalle module, params restored straight into their shardings on `mesh`, model_config)."""
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  model_config = _load_config(directory, dalle.KIND, "--dalle")
  model = dalle.from_model_config(model_config, remat=False, **({"dtype": dtype} if dtype else {}))
  abstract, _ = sharding.abstract_sharded_state(_param_init(model), mesh, rules)
  params, _ = checkpoint.load_model(directory, kind=dalle.KIND, abstract_params=abstract)
  return model, params, model_config


def decoding_model(model, params, mesh=None, rules=RULES):
  """(the model with scan_layers=False, its params unstacked): what sampling should run.

  A scanned layer stack restacks the whole KV cache at every decoded token (flax's scan over the
  "cache" collection); separate layers update their caches in place, about 1.6× faster per token on
  this CPU (bench/sampling.py). Compilation unrolls the layers instead. With `mesh`, the unstacked
  params get their logical shardings. The input params are left as they are (a trainer keeps them).
  """
  if not model.scan_layers:
    return model, params
  unscanned = model.clone(scan_layers=False)
  if mesh is None:
    return unscanned, layers.unstack_layers(params)
  _, shardings = sharding.abstract_sharded_state(_param_init(unscanned), mesh, rules)
  with sharding.mesh_and_rules(mesh, rules):
    return unscanned, jax.jit(layers.unstack_layers, out_shardings=shardings)(params)


def _load_config(directory, kind, flag):
  from mmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    raise DataError(f"{flag}={directory}: no such directory; expected an exported {kind} model "
                    "(params/ + model.json)")
  return checkpoint.load_model_config(directory, kind=kind)


def dalle_tokenizer_path(dalle_dir, override=None):
  """The sentencepiece model the DALL·E export was trained with (see the module docstring)."""
  if override:
    if not os.path.exists(override):
      raise DataError(f"--tokenizer={override}: no such file; expected a sentencepiece .model")
    return override
  from mmjax import zeroshot  # pylint: disable=g-import-not-at-top
  record = os.path.join(dalle_dir, zeroshot.TOKENIZER_JSON)
  if os.path.exists(record):
    with open(record) as f:
      fields = json.load(f)
    kind, model_file = fields.get("kind"), fields.get("model")
    if kind != "sentencepiece" or not model_file:
      raise DataError(f"{record}: tokenizer kind {kind!r}; DALL·E reads sentencepiece rows (give --tokenizer)")
    return os.path.join(dalle_dir, model_file)
  workdir_model = os.path.join(os.path.dirname(os.path.abspath(dalle_dir)), "tokenizer", "spm.model")
  if os.path.exists(workdir_model):
    return workdir_model
  raise DataError(f"--dalle={dalle_dir}: found no tokenizer ({record} or {workdir_model}); give "
                  "--tokenizer=PATH (the sentencepiece .model the transformer was trained with)")


def load_dalle_tokenizer(dalle_dir, model, override=None):
  from mmjax.input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = dalle_tokenizer_path(dalle_dir, override)
  tokenizer = tokenizer_lib.Tokenizer(path)
  if tokenizer.vocab_size != model.text_vocab_size:
    # The "dalle" layout's pad ids are vocab_size + position: only an exact match lines them up.
    raise DataError(f"tokenizer {path} has {tokenizer.vocab_size} ids but the DALL·E export was trained "
                    f"with text_vocab_size={model.text_vocab_size}; give the matching --tokenizer")
  return tokenizer


# ----------------------------------------------------------------------------- the pipeline

@dataclasses.dataclass
class Samples:
  """Every candidate of every prompt; `kept` orders the best `top` per prompt (CLIP or first)."""
  captions: list
  codes: np.ndarray         # int32 [P, N_candidates, grid_size²]
  images: np.ndarray        # uint8 [P, N_candidates, H, W, 3]
  seeds: np.ndarray         # int [P, N_candidates]
  scores: Optional[np.ndarray]  # f32 [P, N_candidates] CLIP cosine, or None without CLIP
  kept: np.ndarray          # int [P, top] candidate indices, best first
  negative_prompts: Optional[list] = None  # per prompt, the captions its candidates were guided away from


class Generator:
  """The three exported models on one mesh; `generate(prompts, ...)` → Samples."""

  def __init__(self, dalle_dir, dvae_dir, clip_dir=None, *, tokenizer=None, clip_tokenizer=None, dtype=None,
               mesh=None, rules=RULES, clip_batch_size=256):
    from mmjax import zeroshot  # pylint: disable=g-import-not-at-top
    from mmjax.train import dvae_encode  # pylint: disable=g-import-not-at-top
    self.mesh = mesh if mesh is not None else sharding.create_mesh(common.mesh_config(data=-1))
    self.rules = tuple(rules)
    model, params, _ = load_dalle(dalle_dir, self.mesh, self.rules, dtype)
    self.model, self.params = decoding_model(model, params, self.mesh, self.rules)
    self.tokenizer = load_dalle_tokenizer(dalle_dir, self.model, tokenizer)
    _load_config(dvae_dir, dvae.KIND, "--dvae")
    self.dvae_model, self.dvae_params, _, _ = dvae_encode.load_dvae(dvae_dir, self.mesh, self.rules, "decoder",
                                                                    dtype or "")
    if self.dvae_model.vocab_size != self.model.image_vocab_size:
      raise DataError(f"--dvae={dvae_dir} has a codebook of {self.dvae_model.vocab_size} but --dalle="
                      f"{dalle_dir} samples image_vocab_size={self.model.image_vocab_size} codes")
    self.clip = None
    if clip_dir:
      _load_config(clip_dir, "clip", "--clip")
      encoder, clip_tokenizer = zeroshot.load(clip_dir, clip_tokenizer, mesh=self.mesh,
                                              batch_size=clip_batch_size, dtype=dtype)
      # zeroshot.load restores the params onto one device; the Encoder runs on the whole mesh.
      replicated = NamedSharding(self.mesh, PartitionSpec())
      encoder.params = jax.tree.map(lambda x: jax.device_put(np.asarray(x), replicated), encoder.params)
      self.clip = (encoder, clip_tokenizer)

  def image_nll(self, captions: Sequence[str], codes):
    """−log p(codes | caption) under the transformer, summed over the grid: f32 [n] for n captions
    and codes int [n, grid_size²] (teacher-forced, one forward pass; rows padded to the mesh)."""
    text = self.tokenizer.tokenize(list(captions), "dalle", self.model.text_length)
    rows, shards = len(captions), batch_shards(self.mesh, self.rules)
    padded = -(-rows // shards) * shards
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - rows, axis=0)])  # noqa: E731
    with sharding.mesh_and_rules(self.mesh, self.rules):
      nll = _image_nll(self.model, self.mesh, self.rules)(
          self.params, pad(np.asarray(text, np.int32)), pad(np.asarray(codes, np.int32)))
    return _gather(nll)[:rows]

  def generate(self, prompts: Sequence[str], num_candidates, top, settings=SamplingSettings(), seed=0,
               batch_size=16, negative_prompts=None):
    """`num_candidates` per prompt, `batch_size` per jitted call (the last call padded), candidate i
    (over all prompts) seeded seed + i; every host calls it and gets the whole result.

    negative_prompts (guided sampling only): one list of captions per prompt; candidate j of prompt p
    is guided away from negative_prompts[p][j mod its length] instead of the all-pad caption.
    """
    if not prompts:
      raise ConfigError("no prompts: give --prompt (repeatable) or --prompts_file")
    check_counts(num_candidates, top, batch_size, batch_shards(self.mesh, self.rules))
    text = self.tokenizer.tokenize(list(prompts), "dalle", self.model.text_length)
    total = len(prompts) * num_candidates
    seeds = seed + np.arange(total)
    owners = np.repeat(np.arange(len(prompts)), num_candidates)  # candidate → its prompt
    negatives = self._negative_text(prompts, num_candidates, negative_prompts)
    codes, images = [], []
    for start in range(0, total, batch_size):
      batch_start = time.perf_counter()
      rows = np.arange(start, start + batch_size) % total  # the last batch wraps; extra rows are dropped
      keys = candidate_keys(seeds[rows])
      batch_codes = sample_image_tokens(self.model, self.params, text[owners[rows]], keys, mesh=self.mesh,
                                        rules=self.rules, **dataclasses.asdict(settings),
                                        negative_tokens=None if negatives is None else negatives[rows])
      batch_images = decode_images(self.dvae_model, self.dvae_params, batch_codes, self.model.grid_size,
                                   self.mesh, self.rules)
      kept = min(batch_size, total - start)
      codes.append(_gather(batch_codes)[:kept])
      images.append(_gather(batch_images)[:kept])
      logging.info("Sampled and decoded %d/%d candidates (%.1f s%s)", start + kept, total,
                   time.perf_counter() - batch_start, ", compiling first" if start == 0 else "")
    codes = np.concatenate(codes).reshape(len(prompts), num_candidates, -1)
    images = np.concatenate(images)
    scores = None
    if self.clip is None:
      logging.info("No --clip: keeping the first %d of %d candidates per prompt, not reranked", top,
                   num_candidates)
      kept = np.tile(np.arange(top), (len(prompts), 1))
    else:
      encoder, clip_tokenizer = self.clip
      scores = clip_scores(encoder, clip_tokenizer, images, [prompts[i] for i in owners])
      scores = scores.reshape(len(prompts), num_candidates)
      kept = rerank(scores, top)
    return Samples(list(prompts), codes, images.reshape(len(prompts), num_candidates, *images.shape[1:]),
                   seeds.reshape(len(prompts), num_candidates), scores, kept,
                   None if negative_prompts is None else [list(row) for row in negative_prompts])

  def _negative_text(self, prompts, num_candidates, negative_prompts):
    """Token rows [P · num_candidates, T] of each candidate's negative caption, or None (all-pad)."""
    if negative_prompts is None:
      return None
    if len(negative_prompts) != len(prompts) or not all(negative_prompts):
      raise ConfigError(f"negative prompts: expected a non-empty list for each of the {len(prompts)} prompts")
    captions = [row[j % len(row)] for row in negative_prompts for j in range(num_candidates)]
    if not all(c.strip() for c in captions):
      raise ConfigError("negative prompts: an empty caption (leave negatives out to guide against no caption)")
    return self.tokenizer.tokenize(captions, "dalle", self.model.text_length)


@functools.lru_cache(maxsize=2)
def _image_nll(model, mesh, rules):
  del mesh, rules  # cache keys, as for _decoder

  def image_nll(params, text_tokens, image_tokens):
    _, image_logits = model.apply({"params": params}, text_tokens, image_tokens,
                                  method=dalle.Dalle.prediction_logits)
    return dalle.image_code_nll(image_logits, image_tokens).sum(axis=-1)
  return jax.jit(image_nll)


def check_counts(num_candidates, top, batch_size, shards=1):
  """ConfigError naming the flag when the candidate counts cannot work."""
  if num_candidates < 1:
    raise ConfigError(f"--num_candidates={num_candidates}: expected ≥ 1")
  if not 1 <= top <= num_candidates:
    raise ConfigError(f"--top={top}: expected 1 ≤ top ≤ --num_candidates={num_candidates}")
  if batch_size < 1 or batch_size % shards:
    raise ConfigError(f"--batch_size={batch_size}: expected a positive multiple of the {shards} devices "
                      "the batch is split over")


def _gather(array):
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ----------------------------------------------------------------------------- sample grids while training

@functools.lru_cache(maxsize=2)
def _training_dvae(directory, mesh, rules):
  from mmjax.train import dvae_encode  # pylint: disable=g-import-not-at-top
  model, params, _, _ = dvae_encode.load_dvae(directory, mesh, rules, "decoder")
  return model, params


def training_samples(*, config, model, params, text_tokens, seed, path):
  """The DALL·E trainer's sample hook: image grids for some of a batch's captions; every host calls it.

  Samples one candidate for each of the first `config.sample_rows` (default 8, rounded up to the
  batch shards) rows of the host-local `text_tokens` with the trainer's (sharded) model and params,
  decodes them with the dVAE export `config.sample_dvae` ("" = <workdir>/dvae, the workdir being the
  parent of path's folder), and writes a grid captioned with the decoded captions to `path` on
  process 0. Default sampling settings; seeds seed + row. Returns the codes [rows, N] (numpy), or
  None when there is no dVAE export (logged as a warning: training goes on).
  """
  rules = tuple(config.logical_axis_rules)
  mesh = sharding.create_mesh(config.mesh)
  workdir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  dvae_dir = config.get("sample_dvae", "") or os.path.join(workdir, "dvae")
  if not os.path.isdir(dvae_dir):
    logging.warning("No dVAE export at %s (config.sample_dvae): skipped the sample grid %s", dvae_dir, path)
    return None
  shards = batch_shards(mesh, rules)
  rows = -(-int(config.get("sample_rows", 8)) // shards) * shards
  local_rows = sharding.process_batch_size(rows, mesh, rules)
  if len(text_tokens) < local_rows:
    raise ConfigError(f"config.sample_rows: sampling {rows} rows needs {local_rows} caption rows on this "
                      f"host, the batch has {len(text_tokens)}")
  local = np.asarray(text_tokens)[:local_rows]
  text = sharding.make_global_batch({"text_tokens": local}, mesh, rules)["text_tokens"]
  codes = sample_image_tokens(model, params, text, candidate_keys(seed + np.arange(rows)), mesh=mesh, rules=rules)
  dvae_model, dvae_params = _training_dvae(dvae_dir, mesh, rules)
  images = _gather(decode_images(dvae_model, dvae_params, codes, model.grid_size, mesh, rules))
  text, codes = _gather(text), _gather(codes)
  if jax.process_index() == 0:
    from mmjax.input_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    from mmjax.train import image_grid, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    tokenizer_file = workdir_lib.tokenizer_path(config, workdir)
    if os.path.exists(tokenizer_file):
      captions = [tokenizer_lib.Tokenizer(tokenizer_file).decode(row) for row in text]
    else:
      captions = [f"row {i} (no tokenizer at {tokenizer_file})" for i in range(rows)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid.save_grid(images, captions, path)
    logging.info("Wrote %d samples to %s", rows, path)
  return codes


# ----------------------------------------------------------------------------- outputs

def save_rows(images, captions, labels, path):
  """A PNG with one row per caption: the caption across the row, then its images, each under a one-line
  label. images uint8 [P, K, H, W, 3]; labels [P][K] strings. Small images are enlarged (≥ 96 px)."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  rows, columns, height, width, _ = images.shape
  scale = max(1, -(-96 // width))
  cell_w, cell_h = width * scale, height * scale
  font = ImageFont.load_default()
  line_h = font.getbbox("Ay")[3] + 2
  row_w = columns * (cell_w + 4) + 4
  chars = max(8, (row_w - 8) // max(1, font.getbbox("x")[2]))
  wrapped = [textwrap.wrap(c, chars)[:3] or [""] for c in captions]
  row_h = [len(lines) * line_h + line_h + cell_h + 8 for lines in wrapped]
  grid = Image.new("RGB", (row_w, sum(row_h) + 4), "white")
  draw = ImageDraw.Draw(grid)
  y = 4
  for r in range(rows):
    for k, line in enumerate(wrapped[r]):
      draw.text((4, y + k * line_h), line, fill="black", font=font)
    top = y + len(wrapped[r]) * line_h
    for c in range(columns):
      x = 4 + c * (cell_w + 4)
      draw.text((x, top), labels[r][c], fill="dimgray", font=font)
      grid.paste(Image.fromarray(images[r, c]).resize((cell_w, cell_h), Image.NEAREST), (x, top + line_h))
    y += row_h[r]
  grid.save(path)


def write_outputs(samples, png_path, json_path, settings_record):
  """The grid of kept candidates and the JSON record (captions, settings, seeds, scores)."""
  scores = samples.scores
  images = np.stack([samples.images[p, kept] for p, kept in enumerate(samples.kept)])
  labels = [[f"seed {samples.seeds[p, j]}" + ("" if scores is None else f"  {scores[p, j]:.3f}") for j in kept]
            for p, kept in enumerate(samples.kept)]
  for path in (png_path, json_path):
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
  save_rows(images, samples.captions, labels, png_path)
  score = lambda p, j: None if scores is None else float(scores[p, j])  # noqa: E731
  record = {
      **settings_record,
      "reranked": scores is not None,
      "score": "CLIP cosine similarity of image and caption" if scores is not None else None,
      "prompts": [{
          "caption": caption,
          "kept": [{"candidate": int(j), "seed": int(samples.seeds[p, j]), "score": score(p, j)}
                   for j in samples.kept[p]],
          "candidates": [{"seed": int(s), "score": score(p, j)} for j, s in enumerate(samples.seeds[p])],
          **({} if samples.negative_prompts is None else {"negative_prompts": samples.negative_prompts[p]}),
      } for p, caption in enumerate(samples.captions)],
  }
  with open(json_path, "w") as f:
    json.dump(record, f, indent=1)


# ----------------------------------------------------------------------------- CLI

def define_flags():
  """Defined only when run as a program, so importing this module defines no flags."""
  flags.DEFINE_string("dalle", None, "Exported DALL·E transformer directory.")
  flags.DEFINE_string("dvae", None, "Exported dVAE directory (its decoder turns codes into pixels).")
  flags.DEFINE_string("clip", None, "Exported CLIP directory; without it the first --top candidates are kept.")
  flags.DEFINE_multi_string("prompt", [], "A caption; repeat for several.")
  flags.DEFINE_string("prompts_file", None, "A text file of captions, one per line (blank lines skipped).")
  flags.DEFINE_integer("num_candidates", 16, "Candidates sampled per caption.")
  flags.DEFINE_integer("top", 8, "Candidates kept per caption (the best by CLIP score).")
  flags.DEFINE_string("output", "samples.png", "Image grid PNG.")
  flags.DEFINE_string("json", None, "Scores and seeds JSON (default: --output with .json).")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 samples the argmax.")
  flags.DEFINE_integer("top_k", 0, "Keep only the k most likely codes (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the most likely codes up to this probability (1 = all).")
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (unset = no guidance).")
  flags.DEFINE_multi_string("negative_prompt", [], "With --guidance_scale: guide away from this caption instead "
                            "of the empty one; repeat to cycle each prompt's candidates through several.")
  flags.DEFINE_integer("seed", 0, "Candidate i of the run (over all prompts) uses seed + i.")
  flags.DEFINE_integer("batch_size", 16, "Candidates per sampling call (a multiple of the device count).")
  flags.DEFINE_string("tokenizer", None, "The DALL·E sentencepiece .model (default: found next to --dalle).")
  flags.DEFINE_string("clip_tokenizer", None, "Override CLIP's tokenizer (as mmjax.zeroshot --tokenizer).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the models' compute dtype.")
  flags.mark_flags_as_required(["dalle", "dvae"])


def read_prompts(prompts, prompts_file):
  prompts = list(prompts)
  if prompts_file:
    if not os.path.exists(prompts_file):
      raise DataError(f"--prompts_file={prompts_file}: no such file")
    with open(prompts_file) as f:
      lines = [line.strip() for line in f]
    blank = sum(1 for line in lines if not line)
    if blank:
      logging.info("--prompts_file: skipped %d blank lines", blank)
    prompts += [line for line in lines if line]
  if not prompts:
    raise ConfigError("no prompts: give --prompt (repeatable) or --prompts_file")
  return prompts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  args = flags.FLAGS
  json_path = args.json or os.path.splitext(args.output)[0] + ".json"
  try:
    prompts = read_prompts(args.prompt, args.prompts_file)
    check_counts(args.num_candidates, args.top, args.batch_size)  # before minutes of loading
    if args.negative_prompt and args.guidance_scale is None:
      raise ConfigError("--negative_prompt needs --guidance_scale")
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.guidance_scale)
    generator = Generator(args.dalle, args.dvae, args.clip, tokenizer=args.tokenizer,
                          clip_tokenizer=args.clip_tokenizer, dtype=args.dtype)
    start = time.perf_counter()
    negatives = [args.negative_prompt] * len(prompts) if args.negative_prompt else None
    samples = generator.generate(prompts, args.num_candidates, args.top, settings, args.seed, args.batch_size,
                                 negatives)
  except (ConfigError, DataError) as e:
    sys.exit(f"mmjax.generate: error: {e}")
  if jax.process_index() == 0:
    record = {"command": shlex.join(["python", "-m", "mmjax.generate", *sys.argv[1:]]),
              "dalle": args.dalle, "dvae": args.dvae, "clip": args.clip,
              "num_candidates": args.num_candidates, "top": args.top, "seed": args.seed,
              **dataclasses.asdict(settings)}
    write_outputs(samples, args.output, json_path, record)
    logging.info("Wrote %s and %s: %d prompts × %d kept of %d candidates (%.1f s)", args.output, json_path,
                 len(prompts), args.top, args.num_candidates, time.perf_counter() - start)


if __name__ == "__main__":
  from mmjax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
