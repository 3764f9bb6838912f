"""The DALL·E transformer trainer (stage two): caption tokens then dVAE codes, one causal sequence.

  python -m mmjax.main --config=mmjax/configs/dalle_shapes.py --workdir=/tmp/shapes
  python -m mmjax.tools.aot --config=mmjax/configs/dalle_12b.py --topology=v5e:4x4

Reads top to bottom: schedule and checks, mesh, data, model and state, step, eval, loop.

Data (`config.data.source`): "tokens" reads the dVAE encode job's token files from
`config.data.tokens_dir` ("" = <workdir>/tokens), after checking their metadata.json against
config.model; "synthetic" generates learnable token rows (token_pipeline.synthetic_token_dataset)
for tests, AOT and throughput runs without a dVAE.

Objective: `dalle.dalle_loss`, cross-entropy averaged per modality, text × 1/8 + image × 7/8.
AdamW with the paper's β2 0.96, weight decay 4.5e-2 (not on gains, biases, embeddings or position
tables) and clipping at global norm 4; the step size warms up linearly then follows a cosine
(config.optimizer; the schedule is the dVAE trainer's).

Gradient accumulation (mmjax.train.accumulate): `config.accumulation_steps = k` microbatches per
update (0 = as many as keep `config.microbatch_per_shard` rows on each batch shard, so one config
serves any slice), a `lax.scan` summing their gradients in `config.accumulation_dtype`. The loss is
a per-example mean, so the average is the whole batch's gradient up to rounding, with the
activations of B/k rows.

Memory switches the 12B needs on 16 GiB chips (all off in the tiny configs):
  param_copy_dtype   gradients of a bf16 copy of the matrices (half-size all-gathers and gradients)
  optimizer.moment_dtype  Adam's mu and nu stored in bf16 (the paper kept them in 16 bits)
  ema_decay = 0      no EMA copy of the params; eval and export use the params themselves

Workdir: checkpoints/ (Orbax, resumed automatically with the data iterator position),
tensorboard/, dalle/ (the exported EMA or final params + model.json, loaded with
`checkpoint.load_model(dir, kind="dalle")` and `dalle.from_model_config`), samples/step_N.png
(every `config.sample_every_steps`, drawn by `mmjax.generate.training_samples`: see `sample_hook`).
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
from flax.training import train_state
from jax.experimental import multihost_utils

from mmjax import sharding
from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline, token_files, token_pipeline
from mmjax.models import dalle
from mmjax.train import accumulate, checkpoint as checkpoint_lib
from mmjax.train import metrics as metrics_lib, state as state_lib
# The warmup + cosine schedule and the fast-compiling sharded init are the dVAE trainer's.
from mmjax.train.accumulate import accumulation_steps
from mmjax.train.state import create_sharded_state, learning_rate_schedule

EXPORT_DIR = "dalle"
SAMPLES_DIR = "samples"
SOURCES = ("tokens", "synthetic")
# Leaves that take no weight decay: gains ("scale"), biases, the token embeddings and position tables.
NO_DECAY_NAMES = ("bias", "scale", "embedding", "text_positions", "image_rows", "image_columns")
BATCH_KEYS = ("text_tokens", "image_tokens")


# ----------------------------------------------------------------------------- checks

def check_config(config):
  """ConfigError naming the first training field that cannot work."""
  def require(condition, field, message):
    if not condition:
      raise ConfigError(f"config.{field}: {message}")
  require(config.num_train_steps > 0, "num_train_steps", f"must be positive, got {config.num_train_steps}")
  require(config.data.source in SOURCES, "data.source", f"{config.data.source!r} is not one of {SOURCES}")
  accumulate.check_config(config)
  require(0 <= config.ema_decay < 1, "ema_decay", f"must be in [0, 1) (0 = no EMA), got {config.ema_decay}")
  opt = config.optimizer
  require(0 <= opt.warmup_steps < opt.decay_steps, "optimizer.decay_steps",
          f"must exceed optimizer.warmup_steps={opt.warmup_steps}, got {opt.decay_steps}")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    require(config[field] > 0, field, f"must be positive, got {config[field]}")
  require(config.eval_batches >= 0, "eval_batches", f"must be >= 0 (0 = the whole split), got {config.eval_batches}")
  require(config.data.source == "tokens" or config.eval_batches > 0, "eval_batches",
          "synthetic tokens never end: give a number of eval batches")
  require(0 <= config.caption_dropout < 1, "caption_dropout", f"must be in [0, 1), got {config.caption_dropout}")
  require(config.sample_every_steps >= 0, "sample_every_steps", f"must be >= 0 (0 = off), got "
          f"{config.sample_every_steps}")
  if config.sample_every_steps:
    _sampler()  # fails now, not after hours of training


# ----------------------------------------------------------------------------- data

def tokens_dir(config, workdir):
  return config.data.tokens_dir or os.path.join(workdir, "tokens")


def check_token_files(config, path):
  """The token files' metadata, after checking that they fit config.model (ConfigError otherwise)."""
  metadata = token_files.read_metadata(path)
  model = config.model
  token_pipeline.check_metadata(metadata, path, model.text_length, model.grid_size, model.image_vocab_size,
                                model.text_vocab_size)
  return metadata


def create_dataset(config, workdir, *, train):
  """This host's batches for training (endless) or eval (None when there is no eval split)."""
  model, data = config.model, config.data
  if data.source == "synthetic":
    # Eval draws another seed's rows: the same rule, captions the model has not trained on.
    return token_pipeline.synthetic_token_dataset(
        data.global_batch, model.text_length, model.text_vocab_size, model.grid_size ** 2,
        model.image_vocab_size, seed=config.seed + (0 if train else 1), num_words=data.synthetic_words,
        train=train)
  path = tokens_dir(config, workdir)
  metadata = check_token_files(config, path)
  split = data.split if train else config.eval_split
  if not train and split not in metadata["splits"]:
    logging.warning("Token files %s have no %r split (finished: %s): no validation loss", path, split,
                    sorted(metadata["splits"]))
    return None
  return token_pipeline.create_token_dataset(path, split, data.global_batch, train=train, seed=config.seed,
                                             shuffle_buffer=data.shuffle_buffer)


def global_batch(local, mesh, rules):
  return sharding.make_global_batch({k: local[k] for k in BATCH_KEYS}, mesh, rules)


# ----------------------------------------------------------------------------- model and state

def create_model(config):
  return dalle.from_model_config(config.model)


def weight_decay_mask(params):
  return state_lib.no_decay_mask(params, names=NO_DECAY_NAMES)


def with_moment_dtype(tx, dtype):
  """`tx` storing Adam's two moments in `dtype` (None: unchanged). The paper kept them in 16 bits;
  in bf16 they take half the HBM of f32 (the 12B config needs it). Each update upcasts them and
  runs in f32, so only the stored moments are rounded."""
  if not dtype:
    return tx

  def cast(state, to):
    def cast_adam(s):
      if not isinstance(s, optax.ScaleByAdamState):
        return s
      return s._replace(mu=jax.tree.map(lambda x: x.astype(to), s.mu),
                        nu=jax.tree.map(lambda x: x.astype(to), s.nu))
    return jax.tree.map(cast_adam, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)
  return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)


def create_optimizer(config):
  """AdamW (state.adamw: clipping, no decay on NO_DECAY_NAMES) with config.optimizer.moment_dtype."""
  tx = state_lib.adamw(learning_rate_schedule(config), config.optimizer, mask=weight_decay_mask)
  return with_moment_dtype(tx, config.optimizer.get("moment_dtype") or None)


class TrainState(state_lib.TrainState):
  """state.TrainState whose EMA is optional: `ema_params` is None when ema_decay is 0."""

  def apply_gradients(self, *, grads, **kwargs):
    if self.ema_params is None:
      return train_state.TrainState.apply_gradients(self, grads=grads, **kwargs)
    return super().apply_gradients(grads=grads, **kwargs)

  @classmethod
  def create(cls, *, apply_fn, params, tx, ema_decay=0.999, **kwargs):
    state = super().create(apply_fn=apply_fn, params=params, tx=tx, ema_decay=ema_decay, **kwargs)
    return state if ema_decay else state.replace(ema_params=None)

  @property
  def eval_params(self):
    return self.params if self.ema_params is None else self.ema_params


def _init_tokens(config, mesh):
  """Dummy text and image rows, one per batch shard, so activation constraints divide."""
  rows = math.prod(mesh.shape[axis] for axis in sharding.batch_axes(config.logical_axis_rules))
  model = config.model
  return (jnp.zeros((rows, model.text_length), jnp.int32), jnp.zeros((rows, model.grid_size ** 2), jnp.int32))


def create_state(config, model, text_tokens, image_tokens, rng):
  """The TrainState (boxed params, AdamW, optional EMA); the init_fn for the sharded init."""
  variables = model.init(rng, text_tokens, image_tokens)
  tx = create_optimizer(config)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx, ema_decay=config.ema_decay)


def init_rng(config):
  """The init key; config.rng_impl picks the PRNG ("rbg" compiles far faster than threefry on a CPU)."""
  return jax.random.fold_in(jax.random.key(config.seed, impl=config.get("rng_impl") or None), 0)


def abstract_state(config, model, mesh):
  """(abstract sharded state, state shardings, init_fn, init rng) without allocating anything."""
  init_fn = functools.partial(create_state, config, model, *_init_tokens(config, mesh))
  rng = init_rng(config)
  abstract, shardings = sharding.abstract_sharded_state(init_fn, mesh, config.logical_axis_rules, rng)
  return abstract, shardings, init_fn, rng


# ----------------------------------------------------------------------------- step

def _loss_fn(config, apply_fn, params, batch):
  predictions = apply_fn({"params": params}, batch["text_tokens"], batch["image_tokens"],
                         method=dalle.Dalle.prediction_logits)
  return dalle.dalle_loss(predictions, batch["text_tokens"], batch["image_tokens"],
                          text_loss_weight=config.text_loss_weight)


def compute_copy(params, dtype):
  """The params' matrices (ndim ≥ 2) in `dtype` ("" = unchanged); gains and biases stay f32.

  Mixed precision: the bf16 model casts its matrices to bf16 at use anyway, so differentiating a
  bf16 copy changes no forward value, while FSDP all-gathers the half-size copy and the gradients
  arrive in bf16 (half the HBM per microbatch). The f32 params, the accumulated gradient and the
  optimizer stay f32.
  """
  if not dtype:
    return params
  return jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, params)


def gradients(config, mesh, steps, param_shardings, apply_fn, params, batch):
  """(f32 grads, metrics) of the batch's mean loss, over `steps` microbatches.

  Every microbatch has the same number of rows and the loss is a per-example mean, so the mean of
  the microbatch gradients is the full batch's gradient. The running sum is sharded like the params
  and kept in `config.accumulation_dtype`; gradients are taken with respect to
  `compute_copy(params, config.param_copy_dtype)`.
  """
  grad_fn = jax.value_and_grad(functools.partial(_loss_fn, config, apply_fn), has_aux=True)
  copy = compute_copy(params, config.param_copy_dtype)

  def microbatch_gradients(microbatch, index):
    del index  # the loss draws no noise
    (_, metrics), grads = grad_fn(copy, microbatch)
    return metrics, grads

  grads, metrics = accumulate.mean_gradients(
      microbatch_gradients, params, batch, steps=steps, mesh=mesh, rules=config.logical_axis_rules,
      param_shardings=param_shardings, dtype=config.accumulation_dtype)
  return grads, jax.tree.map(jnp.mean, metrics)


def caption_dropout_key(config, step):
  """The key of update `step`'s caption dropout: the same on every host, apart from the init key."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed, impl=config.get("rng_impl") or None), 1),
                            step)


def train_step(config, mesh, steps, param_shardings, state, batch):
  """One AdamW update on the batch's loss over `steps` microbatches; returns (state, scalar metrics)."""
  if config.caption_dropout:
    batch = {**batch, "text_tokens": dalle.drop_captions(batch["text_tokens"], config.caption_dropout,
                                                         caption_dropout_key(config, state.step), config.model)}
  grads, metrics = gradients(config, mesh, steps, param_shardings, state.apply_fn, state.params, batch)
  new_state = state.apply_gradients(grads=grads)
  scalars = {
      **metrics,
      "learning_rate": learning_rate_schedule(config)(state.step),
      "grad_norm": optax.tree.norm(grads),   # before clipping
  }
  return new_state, scalars


def jit_train_step(config, state_shardings, mesh):
  rules = config.logical_axis_rules
  steps = accumulation_steps(config, mesh)
  return jax.jit(functools.partial(train_step, config, mesh, steps, state_shardings.params),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def batch_shapes(config):
  batch, model = config.data.global_batch, config.model
  return {"text_tokens": ((batch, model.text_length), jnp.int32),
          "image_tokens": ((batch, model.grid_size ** 2), jnp.int32)}


def aot_train_step(config, mesh):
  """(jitted train step, (abstract state, abstract batch)) for `mmjax.tools.aot`."""
  check_config(config)
  accumulation_steps(config, mesh)
  model = create_model(config)
  state, state_shardings, _, _ = abstract_state(config, model, mesh)
  batch = sharding.abstract_global_batch(batch_shapes(config), mesh, config.logical_axis_rules)
  return jit_train_step(config, state_shardings, mesh), (state, batch)


# ----------------------------------------------------------------------------- eval

def eval_step(config, apply_fn, params, batch):
  _, metrics = _loss_fn(config, apply_fn, params, batch)
  return metrics


@dataclasses.dataclass
class Evaluator:
  """Validation loss (total, text, image) with the eval params over `num_batches` batches."""
  config: Any
  mesh: Any
  dataset: Any
  num_batches: int
  step_fn: Any

  @classmethod
  def create(cls, config, mesh, apply_fn, state_shardings, workdir):
    dataset = create_dataset(config, workdir, train=False)
    if dataset is None:
      return None
    batches = config.eval_batches
    if config.data.source == "tokens":
      # Count this host's batches once (up to eval_batches); every host must run as many steps.
      available = sum(1 for _ in (dataset.take(batches) if batches else dataset))
      batches = min(batches, available) if batches else available
      if jax.process_count() > 1:
        batches = int(multihost_utils.process_allgather(np.array(batches)).min())
      if batches == 0:
        raise ConfigError(f"config.eval_split={config.eval_split!r} holds less than one batch of "
                          f"{config.data.global_batch // jax.process_count()} per process")
    params_sharding = state_shardings.params
    step_fn = jax.jit(functools.partial(eval_step, config, apply_fn),
                      in_shardings=(params_sharding, sharding.batch_sharding(mesh, config.logical_axis_rules)))
    return cls(config, mesh, dataset, batches, step_fn)

  def __call__(self, params, step):
    config, start = self.config, time.perf_counter()
    totals = {}
    for index, local in enumerate(pipeline.DataIterator(self.dataset)):
      if index == self.num_batches:
        break
      with sharding.mesh_and_rules(self.mesh, config.logical_axis_rules):
        metrics = self.step_fn(params, global_batch(local, self.mesh, config.logical_axis_rules))
      for k, v in jax.device_get(metrics).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    results = {k: v / self.num_batches for k, v in totals.items()}
    results["seconds"] = time.perf_counter() - start
    logging.info("eval at step %d on %d batches of %s", step, self.num_batches, config.eval_split)
    return results


# ----------------------------------------------------------------------------- samples

def _sampler():
  """`mmjax.generate.training_samples`, the sampler `sample_hook` calls; ConfigError until it exists."""
  try:
    from mmjax import generate  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"config.sample_every_steps: sampling while training needs mmjax.generate ({e}); "
                      "set it to 0") from e
  if not hasattr(generate, "training_samples"):
    raise ConfigError("config.sample_every_steps: mmjax.generate defines no training_samples(...) yet; "
                      "set it to 0")
  return generate.training_samples


def sample_hook(config, workdir, model, params, step, text_tokens):
  """Every `config.sample_every_steps` (0 = never): a grid of samples for the given caption rows.

  The hook for mmjax.generate: `training_samples(config=, model=, params=, text_tokens=, seed=,
  path=)` samples image tokens for the host-local `text_tokens` rows with the (sharded) params,
  decodes them with the dVAE and writes a PNG to `path` (process 0 writes; every host calls it).
  """
  if not config.sample_every_steps or step % config.sample_every_steps:
    return
  path = os.path.join(workdir, SAMPLES_DIR, f"step_{step:07d}.png")
  _sampler()(config=config, model=model, params=params, text_tokens=text_tokens, seed=config.seed + step,
             path=path)


# ----------------------------------------------------------------------------- loop

def run(config, workdir):
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  rules = config.logical_axis_rules

  # Mesh.
  mesh = sharding.create_mesh(config.mesh)
  steps = accumulation_steps(config, mesh)
  logging.info("Mesh %s over %d devices; %d microbatch(es) of %d rows per update", dict(mesh.shape), mesh.size,
               steps, config.data.global_batch // steps)

  # Data: this host's part of every global batch of (text tokens, image tokens).
  train_iterator = pipeline.DataIterator(create_dataset(config, workdir, train=True))

  # Model and sharded state (restored from the latest checkpoint when there is one).
  model = create_model(config)
  abstract, state_shardings, init_fn, rng = abstract_state(config, model, mesh)
  state, step, checkpoints = state_lib.restore_or_init(config, workdir, train_iterator, abstract, state_shardings,
                                                      init_fn, mesh, rules, rng, "DALL·E transformer")

  # Step and eval.
  train_step_fn = jit_train_step(config, state_shardings, mesh)
  evaluator = Evaluator.create(config, mesh, model.apply, state_shardings, workdir)
  writer = metrics_lib.MetricWriter(workdir)

  # Loop.
  def after_step(state, step, local):
    sample_hook(config, workdir, model, state.eval_params, step, local["text_tokens"])

  state, step, train_scalars, eval_scalars = state_lib.train_loop(
      config, state, step, train_iterator=train_iterator, train_step_fn=train_step_fn,
      make_batch=lambda local: global_batch(local, mesh, rules), mesh=mesh, rules=rules,
      evaluate=None if evaluator is None else lambda state, step: evaluator(state.eval_params, step),
      writer=writer, checkpoints=checkpoints,
      rates={"tokens": config.data.global_batch * model.sequence_length}, after_step=after_step)

  # Export the EMA (or final) params so generation rebuilds the model from model.json.
  checkpoints.wait()
  export_dir = os.path.join(workdir, EXPORT_DIR)
  checkpoint_lib.save_model(export_dir, state.eval_params, dalle.model_config(model))
  checkpoints.close()
  writer.close()
  logging.info("Exported the %s DALL·E transformer at step %d to %s",
               "EMA" if state.ema_params is not None else "final", step, export_dir)
  return state_lib.TrainResult(state=state, step=step, train=train_scalars, eval=eval_scalars, export_dir=export_dir)
