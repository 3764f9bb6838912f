"""The CLIP trainer: images and their captions pulled together, other pairs of the batch pushed apart.

  python -m mmjax.main --config=mmjax/configs/clip_shapes.py:shapes --workdir=/tmp/clip_shapes
  python -m mmjax.main --config=mmjax/configs/clip_vit_b32.py --workdir=gs://BUCKET/clip_vit_b32

Reads top to bottom: config checks, tokenizer, model and state, step, eval, loop.

Objective: the symmetric contrastive loss over the *global* batch (`contrastive.py`), computed under
`shard_map` so each device holds only its rows' block of the logits. AdamW with a linear warmup
and cosine decay (config.optimizer), no weight decay on gains, biases, embeddings and the logit
scale; after every update the logit scale is clamped to ln(max_logit_scale), as OpenAI does.

Gradient accumulation (`config.accumulation_steps = k`) is *gradient caching* (Gao et al. 2021,
OpenCLIP's `--accum-freq`): the loss is still the contrastive loss of the whole global batch, so
k microbatches give the same update as one big batch, not k small-batch losses. Pass 1 runs the
towers over the k microbatches without keeping activations (a `lax.scan`) and gathers all
embeddings; the loss and its gradient with respect to every embedding are computed over the full
batch; pass 2 re-runs each microbatch's towers and backpropagates its slice of those embedding
gradients (a second `lax.scan` summing parameter gradients). Activation memory is that of B/k
rows; the cost is one extra forward pass.

Eval (every `eval_every_steps`, EMA params): image↔text recall@1/5 over the first `eval_examples`
pairs of `eval_split` (captions deduplicated, see contrastive.retrieval_recall), and zero-shot top-1/top-5
on `zeroshot_split` of the dataset's task (mmjax.zeroshot). Every host reads the (small) eval sets
whole, so every host feeds the same global batches.

Workdir: checkpoints/ (Orbax, resumed automatically with the data iterator position),
tensorboard/, clip/ (the exported EMA params, model.json and tokenizer; `python -m mmjax.zeroshot
--checkpoint=<workdir>/clip` and `mmjax.zeroshot.load` read it).
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import sharding, zeroshot
from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline
from mmjax.models import clip
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import contrastive, metrics as metrics_lib, state as state_lib
from mmjax.train import workdir as workdir_lib
# The warmup + cosine schedule and the fast-compiling sharded init are the dVAE trainer's.
from mmjax.train.state import create_sharded_state, learning_rate_schedule

EXPORT_DIR = "clip"
# Leaves that take no weight decay: gains ("scale"), biases, every embedding, the temperature.
NO_DECAY_NAMES = ("bias", "scale", "embedding", "class_embedding", "positional_embedding", "logit_scale")


# ----------------------------------------------------------------------------- config checks

def check_config(config):
  """ConfigError naming the first training field that cannot work."""
  def require(condition, field, message):
    if not condition:
      raise ConfigError(f"config.{field}: {message}")
  model, data = config.model, config.data
  require(config.num_train_steps > 0, "num_train_steps", f"must be positive, got {config.num_train_steps}")
  require(data.get("text_layout", "dalle") == "clip", "data.text_layout",
          f"CLIP reads features at the end-of-text token: use 'clip', got {data.get('text_layout')!r}")
  require(data.pixel_map == "clip", "data.pixel_map",
          f"CLIP models (and mmjax.zeroshot) take CLIP-normalised pixels: use 'clip', got {data.pixel_map!r}")
  require(data.image_size == model.image_size, "data.image_size",
          f"{data.image_size} differs from config.model.image_size={model.image_size}")
  require(data.text_length <= model.context_length, "data.text_length",
          f"{data.text_length} exceeds config.model.context_length={model.context_length}")
  require(config.tokenizer.vocab_size <= model.vocab_size, "tokenizer.vocab_size",
          f"{config.tokenizer.vocab_size} ids do not fit config.model.vocab_size={model.vocab_size}")
  require(config.accumulation_steps >= 1, "accumulation_steps",
          f"must be >= 1, got {config.accumulation_steps}")
  require(data.global_batch % config.accumulation_steps == 0, "accumulation_steps",
          f"{config.accumulation_steps} does not divide config.data.global_batch={data.global_batch}")
  opt = config.optimizer
  require(0 <= opt.warmup_steps < opt.decay_steps, "optimizer.decay_steps",
          f"must exceed optimizer.warmup_steps={opt.warmup_steps}, got {opt.decay_steps}")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    require(config[field] > 0, field, f"must be positive, got {config[field]}")
  require(config.eval_examples >= 0, "eval_examples", f"must be >= 0 (0 = the whole split), got "
          f"{config.eval_examples}")
  require(data.name not in ("folder", "tfrecord") or config.eval_data_path, "eval_data_path",
          f"data.name={data.name!r} has no splits: give the folder or TFRecord glob of held-out pairs")
  require(not config.zeroshot_split or data.name in zeroshot.TASKS, "zeroshot_split",
          f"data.name={data.name!r} has no zero-shot task (those are {sorted(zeroshot.TASKS)}); set it to ''")


def _check_microbatches(config, mesh):
  shards = math.prod(mesh.shape[axis] for axis in sharding.batch_axes(config.logical_axis_rules))
  per_microbatch = config.data.global_batch // config.accumulation_steps
  if per_microbatch % shards:
    raise ConfigError(f"config.accumulation_steps={config.accumulation_steps}: microbatches of "
                      f"{per_microbatch} rows do not split over the {shards} batch shards; use a "
                      f"config.data.global_batch that is a multiple of {config.accumulation_steps * shards}")


# ----------------------------------------------------------------------------- tokenizer

def create_tokenizer(config, workdir):
  """OpenAI's BPE for config.tokenizer.kind == "openai_bpe", else the run's sentencepiece model
  (trained on process 0 when the workdir has none)."""
  if config.tokenizer.get("kind") == "openai_bpe":
    from mmjax.input_pipeline import clip_bpe  # pylint: disable=g-import-not-at-top
    tokenizer = clip_bpe.ClipTokenizer(config.tokenizer.get("merges_path") or None)
  else:
    tokenizer = workdir_lib.ensure_tokenizer(config, workdir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} ids")
  return tokenizer


# ----------------------------------------------------------------------------- model and state

def create_model(config):
  return clip.from_model_config(config.model)


def weight_decay_mask(params):
  return state_lib.no_decay_mask(params, names=NO_DECAY_NAMES)


def _init_batch(config, mesh):
  """Dummy images and tokens with one row per batch shard, so activation constraints divide."""
  rows = math.prod(mesh.shape[axis] for axis in sharding.batch_axes(config.logical_axis_rules))
  size = config.data.image_size
  return (jnp.zeros((rows, size, size, 3), jnp.float32),
          jnp.zeros((rows, config.data.text_length), jnp.int32))


def create_state(config, model, images, tokens, rng):
  """The TrainState (boxed params, AdamW, EMA); the init_fn for the sharded init."""
  variables = model.init(rng, images, tokens)
  tx = state_lib.adamw(learning_rate_schedule(config), config.optimizer, mask=weight_decay_mask)
  return state_lib.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                     ema_decay=config.ema_decay)


def abstract_state(config, model, mesh):
  """(abstract sharded state, state shardings, init_fn, init rng) without allocating anything."""
  init_fn = functools.partial(create_state, config, model, *_init_batch(config, mesh))
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  abstract, shardings = sharding.abstract_sharded_state(init_fn, mesh, config.logical_axis_rules, init_rng)
  return abstract, shardings, init_fn, init_rng


# ----------------------------------------------------------------------------- step

def _towers(module, images, tokens):
  """Unit-norm (image, text) embeddings; `method=` for CLIP.apply."""
  return clip.l2_normalize(module.encode_image(images)), clip.l2_normalize(module.encode_text(tokens))


def _to_microbatches(x, steps, spec):
  """[B, ...] → [steps, B/steps, ...]: microbatch m holds rows m, m + steps, …, so with the batch split
  in contiguous blocks over devices every microbatch is spread over all of them (no data moves)."""
  x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x, spec)


def _from_microbatches(x, spec):
  """Inverse of `_to_microbatches`: [steps, B/steps, ...] → [B, ...] in the original row order."""
  x = x.swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(x.reshape(-1, *x.shape[2:]), spec)


def _cached_gradients(apply_fn, params, images, tokens, loss_fn, steps, mesh, axes):
  """(loss, metrics, grads) of the full-batch loss with the towers run `steps` microbatches at a time."""
  micro = NamedSharding(mesh, PartitionSpec(None, axes))
  full = NamedSharding(mesh, PartitionSpec(axes))
  micro_images, micro_tokens = _to_microbatches(images, steps, micro), _to_microbatches(tokens, steps, micro)

  def embed(p, xs):
    return apply_fn({"params": p}, *xs, method=_towers)

  # Pass 1: every embedding, no activations kept.
  _, (image_embeddings, text_embeddings) = jax.lax.scan(
      lambda carry, xs: (carry, embed(params, xs)), None, (micro_images, micro_tokens))
  image_embeddings = _from_microbatches(image_embeddings, full)
  text_embeddings = _from_microbatches(text_embeddings, full)

  # The full-batch loss; gradients for every embedding (and, through the scale, for logit_scale).
  def loss_of_embeddings(p, images_e, texts_e):
    return loss_fn(images_e, texts_e, apply_fn({"params": p}, method=clip.CLIP.scale))
  (loss, metrics), (scale_grads, image_grads, text_grads) = jax.value_and_grad(
      loss_of_embeddings, argnums=(0, 1, 2), has_aux=True)(params, image_embeddings, text_embeddings)

  # Pass 2: each microbatch's towers again, backpropagating its slice of the embedding gradients.
  def accumulate(grads, xs):
    images_m, tokens_m, image_grads_m, text_grads_m = xs
    _, backward = jax.vjp(lambda p: embed(p, (images_m, tokens_m)), params)
    (tower_grads,) = backward((image_grads_m, text_grads_m))
    return jax.tree.map(jnp.add, grads, tower_grads), None
  grads, _ = jax.lax.scan(accumulate, scale_grads, (micro_images, micro_tokens,
                                                    _to_microbatches(image_grads, steps, micro),
                                                    _to_microbatches(text_grads, steps, micro)))
  return loss, metrics, grads


def train_step(config, mesh, state, batch):
  """One AdamW update on the global-batch contrastive loss; returns (state, scalar metrics)."""
  images, tokens = batch["image"], batch["text_tokens"]
  axes = sharding.batch_axes(config.logical_axis_rules)
  loss_fn = functools.partial(contrastive.sharded_contrastive_loss, mesh=mesh, batch_axes=axes)
  steps = config.accumulation_steps

  if steps == 1:
    def full_loss(params):
      return loss_fn(*state.apply_fn({"params": params}, images, tokens))
    (loss, metrics), grads = jax.value_and_grad(full_loss, has_aux=True)(state.params)
  else:
    loss, metrics, grads = _cached_gradients(state.apply_fn, state.params, images, tokens, loss_fn, steps,
                                             mesh, axes)

  new_state = state.apply_gradients(grads=grads)
  # OpenAI clamps the parameter after every update; the forward's clip alone would leave it free to
  # drift above ln(100) where it gets no gradient. (The EMA, updated in apply_gradients, saw this
  # step's unclamped value; the forward clips the scale anyway.)
  new_state = new_state.replace(params=clip.clamp_logit_scale(new_state.params, config.model.max_logit_scale))
  max_log_scale = math.log(config.model.max_logit_scale)
  scalars = {
      "loss": loss,
      **metrics,
      "logit_scale": jnp.exp(jnp.minimum(new_state.params["logit_scale"], max_log_scale)),
      "learning_rate": learning_rate_schedule(config)(state.step),
      "grad_norm": optax.tree.norm(grads),
  }
  return new_state, scalars


def jit_train_step(config, state_shardings, mesh):
  rules = config.logical_axis_rules
  return jax.jit(functools.partial(train_step, config, mesh),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def batch_shapes(config):
  size, batch = config.data.image_size, config.data.global_batch
  return {"image": ((batch, size, size, 3), jnp.float32),
          "text_tokens": ((batch, config.data.text_length), jnp.int32)}


def aot_train_step(config, mesh):
  """(jitted train step, (abstract state, abstract batch)) for `mmjax.tools.aot`."""
  check_config(config)
  _check_microbatches(config, mesh)
  model = create_model(config)
  state, state_shardings, _, _ = abstract_state(config, model, mesh)
  batch = sharding.abstract_global_batch(batch_shapes(config), mesh, config.logical_axis_rules)
  return jit_train_step(config, state_shardings, mesh), (state, batch)


# ----------------------------------------------------------------------------- eval

EVAL_READ_BATCH = 50   # divides mnist's 500, shapes' 2,000 and the 5,000 default (a remainder is logged)


def read_retrieval_set(config, tokenizer, data_dir):
  """(CLIP pixels, token rows, caption strings) of the first `eval_examples` pairs of the eval split
  (of `eval_data_path` for folder/TFRecord data), in file order. Every process reads all of it."""
  eval_config = config.copy_and_resolve_references()
  if config.data.name in ("folder", "tfrecord"):
    eval_config.data.path = config.eval_data_path
  wanted = config.eval_examples
  eval_config.data.global_batch = min(wanted or EVAL_READ_BATCH, EVAL_READ_BATCH)
  dataset = pipeline.create_dataset(eval_config, data_dir, tokenizer, train=False, split=config.eval_split,
                                    process_index=0, process_count=1)
  images, tokens, captions, count = [], [], [], 0
  for batch in pipeline.DataIterator(dataset, process_index=jax.process_index()):
    images.append(batch["image"])
    tokens.append(batch["text_tokens"])
    captions.append(batch["caption"])
    count += len(batch["caption"])
    if wanted and count >= wanted:
      break
  if not captions:
    raise ConfigError(f"config.eval_split={config.eval_split!r} of {config.data.name!r} holds less than one "
                      f"batch of {eval_config.data.global_batch} pairs")
  if wanted and count < wanted:
    logging.warning("config.eval_examples=%d, but the eval split gives %d pairs: using those", wanted, count)
  limit = wanted or count
  return (np.concatenate(images)[:limit], np.concatenate(tokens)[:limit], np.concatenate(captions)[:limit])


@dataclasses.dataclass
class Evaluator:
  """Retrieval recall@1/5 on the eval split and zero-shot accuracy, with the given (EMA) params."""
  config: Any
  encoder: Any                      # zeroshot.Encoder; its params are set per call
  images: Any = None                # retrieval set: CLIP pixels, tokens and caption strings
  tokens: Any = None
  captions: Any = None
  zeroshot_eval: Any = None

  @classmethod
  def create(cls, config, mesh, model, tokenizer, data_dir):
    encoder = zeroshot.Encoder(model, mesh=mesh, rules=config.logical_axis_rules,
                               batch_size=config.data.global_batch // config.accumulation_steps)
    evaluator = cls(config, encoder)
    evaluator.images, evaluator.tokens, evaluator.captions = read_retrieval_set(config, tokenizer, data_dir)
    if config.zeroshot_split:
      evaluator.zeroshot_eval = zeroshot.ZeroShotEval(
          config.data.name, config.zeroshot_split, tokenizer, config.data.image_size, config.data.text_length,
          data_dir)
    else:
      logging.warning("config.zeroshot_split is empty: eval reports retrieval only, no zero-shot accuracy")
    logging.info("Eval sets: %d image–caption pairs of %s/%s for retrieval%s", len(evaluator.captions),
                 config.data.name, config.eval_split,
                 f"; {len(evaluator.zeroshot_eval.labels)} labelled images of {config.data.name}/"
                 f"{config.zeroshot_split} for zero-shot" if evaluator.zeroshot_eval else "")
    return evaluator

  def __call__(self, params, step):
    start = time.perf_counter()
    self.encoder.params = params
    results = contrastive.retrieval_recall(self.encoder.images(self.images), self.encoder.texts(self.tokens),
                                           self.captions)
    if self.zeroshot_eval is not None:
      accuracy = self.zeroshot_eval(self.encoder)
      results.update({"zeroshot_top1": accuracy["top1"], "zeroshot_top5": accuracy["top5"]})
    self.encoder.params = None  # do not keep the donated-away state's arrays alive
    results["seconds"] = time.perf_counter() - start
    logging.info("eval at step %d: %d pairs of %s/%s", step, len(self.captions), self.config.data.name,
                 self.config.eval_split)
    return results


# ----------------------------------------------------------------------------- loop

def run(config, workdir):
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  rules = config.logical_axis_rules

  # Mesh.
  mesh = sharding.create_mesh(config.mesh)
  _check_microbatches(config, mesh)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # Data: this host's part of every global batch of images and "clip"-layout token rows.
  data_dir = workdir_lib.prepare_data(config, workdir)   # before the tokenizer, which may read captions
  tokenizer = create_tokenizer(config, workdir)
  train_iterator = pipeline.DataIterator(pipeline.create_dataset(config, data_dir, tokenizer, train=True))

  # Model and sharded state (restored from the latest checkpoint when there is one).
  model = create_model(config)
  abstract, state_shardings, init_fn, init_rng = abstract_state(config, model, mesh)
  state, step, checkpoints = state_lib.restore_or_init(config, workdir, train_iterator, abstract, state_shardings,
                                                      init_fn, mesh, rules, init_rng, "CLIP")

  # Step and eval.
  train_step_fn = jit_train_step(config, state_shardings, mesh)
  evaluator = Evaluator.create(config, mesh, model, tokenizer, data_dir)
  writer = metrics_lib.MetricWriter(workdir)

  # Loop.
  def make_batch(local):
    return sharding.make_global_batch({"image": local["image"], "text_tokens": local["text_tokens"]}, mesh, rules)

  state, step, train_scalars, eval_scalars = state_lib.train_loop(
      config, state, step, train_iterator=train_iterator, train_step_fn=train_step_fn, make_batch=make_batch,
      mesh=mesh, rules=rules, evaluate=lambda state, step: evaluator(state.ema_params, step), writer=writer,
      checkpoints=checkpoints, rates={"examples": config.data.global_batch})

  # Export the EMA params with their model config and tokenizer.
  checkpoints.wait()
  export_dir = os.path.join(workdir, EXPORT_DIR)
  checkpoint_lib.save_model(export_dir, state.ema_params, clip.model_config(model))
  zeroshot.save_tokenizer(export_dir, tokenizer)
  checkpoints.close()
  writer.close()
  logging.info("Exported the EMA CLIP at step %d to %s", step, export_dir)
  return state_lib.TrainResult(state=state, step=step, train=train_scalars, eval=eval_scalars, export_dir=export_dir)
