"""The dVAE trainer (DALL·E stage one): images → codebook grid → images.

  python -m mmjax.main --config=mmjax/configs/dvae_shapes.py:shapes --workdir=/tmp/dvae_shapes

Reads top to bottom: schedules, mesh, data, model, shard, step, checkpoint, eval, loop.

Objective (DALL·E paper §2.1): decode a gumbel-softmax relaxation of the encoder's codes at
temperature τ and maximise the evidence lower bound
    ELB = E[ln p(x | z)] − β · KL(q(z | x) ‖ uniform),
with p the logit-Laplace likelihood of the pixels mapped into (ε, 1−ε), ε = 0.1 (the
pipeline's `pixel_map="dvae"`). The loss is −ELB per *pixel dimension*:
    loss = mean_over_images(NLL + β·KL) / (H·W·C)
so its scale, and a good learning rate, do not depend on the image size. τ anneals 1 → 1/16
on a cosine schedule, β rises linearly 0 → 6.6, the learning rate warms up then decays on a
cosine (config.temperature, config.kl, config.optimizer). The tiny configs swap in what a run
of minutes needs (`config.likelihood="gaussian"`, `straight_through`, `usage_weight`; see
dvae_shapes.py). Eval and export use the EMA of the params and argmax codes (no noise), which is
what the transformer will be trained on.

Gradient accumulation (mmjax.train.accumulate, as the DALL·E trainer): `config.accumulation_steps
= k` microbatches per update (0 = as many as keep `config.microbatch_per_shard` images on each
batch shard), their gradients summed in `config.accumulation_dtype`. The gumbel noise of each
image is keyed by its row in the global batch, so k changes neither the gradient (up to rounding)
nor the metrics, only the activation memory (that of B/k images).

Workdir: checkpoints/ (Orbax, resumed automatically with the data iterator position),
tensorboard/, reconstructions/step_N.png (originals above reconstructions), dvae/ (the
exported EMA params + model.json, loaded with `checkpoint.load_model`; model.json records the
training image_size, which `mmjax.tools.dvae encode` then uses by default).
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
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from mmjax import sharding
from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline, preprocess
from mmjax.models import dvae
from mmjax.train import accumulate, checkpoint as checkpoint_lib
from mmjax.train import image_grid, metrics as metrics_lib, state as state_lib
from mmjax.train import workdir as workdir_lib
from mmjax.train.state import create_sharded_state, learning_rate_schedule

EXPORT_DIR = "dvae"
GRID_DIR = "reconstructions"


# ----------------------------------------------------------------------------- schedules

def temperature_schedule(config):
  """Gumbel-softmax temperature: cosine from `start` to `end` over `anneal_steps`, then `end`."""
  start, end, steps = config.temperature.start, config.temperature.end, config.temperature.anneal_steps

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return schedule


def kl_weight_schedule(config):
  """β: linear from 0 to `weight` over `warmup_steps`, then constant."""
  weight, steps = config.kl.weight, config.kl.warmup_steps

  def schedule(step):
    if steps <= 0:
      return jnp.asarray(weight, jnp.float32)
    return weight * jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
  return schedule


def check_config(config):
  """ConfigError naming the first training field that cannot work."""
  def require(condition, field, message):
    if not condition:
      raise ConfigError(f"config.{field}: {message}")
  require(config.num_train_steps > 0, "num_train_steps", f"must be positive, got {config.num_train_steps}")
  require(config.data.pixel_map == "dvae", "data.pixel_map",
          f"the dVAE's logit-Laplace likelihood needs pixels in (ε, 1−ε): use 'dvae', got "
          f"{config.data.pixel_map!r}")
  factor = 2 ** (config.model.group_count - 1)
  require(config.data.image_size % factor == 0, "data.image_size",
          f"{config.data.image_size} is not divisible by 2^(model.group_count−1) = {factor}")
  opt = config.optimizer
  require(0 <= opt.warmup_steps < opt.decay_steps, "optimizer.decay_steps",
          f"must exceed optimizer.warmup_steps={opt.warmup_steps}, got {opt.decay_steps}")
  require(config.likelihood in ("logit_laplace", "gaussian"), "likelihood",
          f"expected 'logit_laplace' or 'gaussian', got {config.likelihood!r}")
  require(config.gaussian_scale > 0, "gaussian_scale", f"must be positive, got {config.gaussian_scale}")
  require(config.usage_weight >= 0, "usage_weight", f"must be >= 0, got {config.usage_weight}")
  require(config.temperature.end > 0 and config.temperature.start > 0, "temperature",
          f"start and end must be positive, got {config.temperature.start} and {config.temperature.end}")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    require(config[field] > 0, field, f"must be positive, got {config[field]}")
  require(config.eval_batches >= 0, "eval_batches", f"must be >= 0 (0 = the whole split), got "
          f"{config.eval_batches}")
  accumulate.check_config(config)


# ----------------------------------------------------------------------------- model and state

def create_model(config):
  return dvae.from_model_config(config.model)


def _init_batch(config, mesh):
  """Rows of the dummy init batch: one per batch shard, so activation constraints divide."""
  axes = sharding.batch_axes(config.logical_axis_rules)
  rows = math.prod(mesh.shape[axis] for axis in axes)
  size = config.data.image_size
  return jnp.full((rows, size, size, config.model.input_channels), 0.5, jnp.float32)


def create_state(config, model, images, rng):
  """The TrainState (boxed params, AdamW, EMA); the init_fn for sharding.create_sharded_state."""
  variables = model.init(rng, images, temperature=1.0, rng=None, deterministic=True)
  tx = state_lib.adamw(learning_rate_schedule(config), config.optimizer)
  return state_lib.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                     ema_decay=config.ema_decay)


def abstract_state(config, model, mesh):
  """(abstract sharded state, state shardings, init_fn, init rng) without allocating anything."""
  init_fn = functools.partial(create_state, config, model, _init_batch(config, mesh))
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  abstract, shardings = sharding.abstract_sharded_state(init_fn, mesh, config.logical_axis_rules, init_rng)
  return abstract, shardings, init_fn, init_rng


# ----------------------------------------------------------------------------- step

def _psnr(mse):
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def floor_log_scale(stats, min_log_scale):
  """Clamps the logit-Laplace log-scales at `min_log_scale` (None: unchanged).

  Pixels are 8-bit: a scale far below one quantisation step in logit space buys unbounded
  likelihood on perfectly flat regions (the shapes' black background) while the gradients at
  the objects' edges grow as 1/b; the floor keeps the objective bounded there.
  """
  if min_log_scale is None:
    return stats
  location, log_scale = dvae.split_stats(stats)
  return jnp.concatenate([location, jnp.maximum(log_scale, min_log_scale)], axis=-1)


def gumbel_codes(logits, temperature, rng, rows, straight_through=False):
  """Gumbel-softmax sample (f32) whose noise for each image is keyed by its row in the global batch
  (`fold_in(rng, row)`): the step's noise is the same however the batch is split into microbatches.

  `straight_through`: the forward pass gives the sample's one-hot argmax (the decoder sees real
  codes, as at eval) while gradients flow through the relaxed sample.
  """
  draw = lambda row: jax.random.gumbel(jax.random.fold_in(rng, row), logits.shape[1:], jnp.float32)
  noise = nn.with_logical_constraint(jax.vmap(draw)(rows), dvae.BATCH_ONLY)
  soft = jax.nn.softmax((logits.astype(jnp.float32) + noise) / temperature, axis=-1)
  if not straight_through:
    return soft
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1], dtype=soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


def reconstruction_nll(config, stats, images):
  """Per-image NLL [B] of the pixel-mapped images under `config.likelihood`: the paper's logit-Laplace
  (log-scales floored at `config.min_log_scale`) or a Gaussian of std `config.gaussian_scale`."""
  if config.likelihood == "gaussian":
    return dvae.gaussian_nll(stats, images, config.gaussian_scale)
  return dvae.logit_laplace_nll(floor_log_scale(stats, config.min_log_scale), images)


def _microbatch_loss(config, apply_fn, temperature, kl_weight, rng, steps, params, images, index):
  """(loss, metrics) of one microbatch: per-image means (so the mean over equal microbatches is the
  batch's) and the histogram of its argmax codes (summed over microbatches for codebook use)."""
  variables = {"params": params}
  logits = apply_fn(variables, images, method="encode")
  rows = accumulate.microbatch_rows(index, steps, images.shape[0])
  codes = gumbel_codes(logits, temperature, rng, rows, config.straight_through)
  stats = apply_fn(variables, codes, method="decode")
  nll, kl = reconstruction_nll(config, stats, images), dvae.kl_to_uniform(logits)
  usage_kl = dvae.usage_kl_to_uniform(logits)
  pixel_dims, positions = math.prod(images.shape[1:]), math.prod(logits.shape[1:3])
  loss = jnp.mean(nll + kl_weight * kl) / pixel_dims + config.usage_weight * usage_kl
  mse = jnp.mean((dvae.reconstruct_pixels(stats) - dvae.unmap_pixels(images)) ** 2, axis=(1, 2, 3))
  vocab = logits.shape[-1]
  metrics = {
      "loss": loss,
      "nll_per_dim": jnp.mean(nll) / pixel_dims,
      "kl_per_code": jnp.mean(kl) / positions,
      "usage_kl": usage_kl,
      "mse": jnp.mean(mse),
      "psnr": jnp.mean(_psnr(mse)),
      "code_counts": jnp.bincount(jnp.argmax(logits, axis=-1).reshape(-1), length=vocab),
  }
  return loss, metrics


def _perplexity_of_counts(counts):
  """exp(entropy) of a code histogram (as `dvae.codebook_perplexity(logits, hard=True)`)."""
  usage = counts / jnp.sum(counts)
  return jnp.exp(-jnp.sum(jnp.where(usage > 0, usage * jnp.log(jnp.where(usage > 0, usage, 1.0)), 0.0)))


def gradients(config, mesh, steps, param_shardings, state, batch):
  """(f32 grads, scalar metrics) of the batch's loss over `steps` microbatches (mmjax.train.accumulate).

  The loss is a per-image mean and the gumbel noise of each image is keyed by its global row, so
  any number of microbatches gives the full batch's gradient (up to rounding) and its metrics:
  means of per-image means, and perplexity / codes_used of the summed code histogram.
  """
  step = state.step
  temperature = temperature_schedule(config)(step)
  kl_weight = kl_weight_schedule(config)(step)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1), step)
  loss_fn = functools.partial(_microbatch_loss, config, state.apply_fn, temperature, kl_weight, rng, steps)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def microbatch_gradients(microbatch, index):
    (_, metrics), grads = grad_fn(state.params, microbatch["image"], index)
    return metrics, grads

  grads, metrics = accumulate.mean_gradients(
      microbatch_gradients, state.params, batch, steps=steps, mesh=mesh, rules=config.logical_axis_rules,
      param_shardings=param_shardings, dtype=config.accumulation_dtype)
  counts = jnp.sum(metrics.pop("code_counts"), axis=0)
  scalars = {k: jnp.mean(v) for k, v in metrics.items()}
  scalars.update(perplexity=_perplexity_of_counts(counts), codes_used=jnp.mean(counts > 0),
                 temperature=temperature, kl_weight=kl_weight)
  return grads, scalars


def train_step(config, mesh, steps, param_shardings, state, batch):
  """One AdamW update on the (temperature, β)-weighted loss; returns (state, scalar metrics)."""
  grads, scalars = gradients(config, mesh, steps, param_shardings, state, batch)
  new_state = state.apply_gradients(grads=grads)
  scalars.update(learning_rate=learning_rate_schedule(config)(state.step), grad_norm=optax.tree.norm(grads))
  return new_state, scalars


def jit_train_step(config, state_shardings, mesh):
  rules = config.logical_axis_rules
  steps = accumulate.accumulation_steps(config, mesh)
  return jax.jit(functools.partial(train_step, config, mesh, steps, state_shardings.params),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def batch_shapes(config):
  size, channels = config.data.image_size, config.model.input_channels
  return {"image": ((config.data.global_batch, size, size, channels), jnp.float32)}


def aot_train_step(config, mesh):
  """(jitted train step, (abstract state, abstract batch)) for `mmjax.tools.aot`."""
  check_config(config)
  accumulate.accumulation_steps(config, mesh)
  model = create_model(config)
  state, state_shardings, _, _ = abstract_state(config, model, mesh)
  batch = sharding.abstract_global_batch(batch_shapes(config), mesh, config.logical_axis_rules)
  return jit_train_step(config, state_shardings, mesh), (state, batch)


def eval_step(config, apply_fn, params, batch):
  """Argmax codes decoded with the given (EMA) params: per-batch sums and uint8 reconstructions."""
  images = batch["image"]
  logits, stats = apply_fn({"params": params}, images, temperature=1.0, rng=None, deterministic=True)
  reconstructions = dvae.reconstruct_pixels(stats)
  mse = jnp.mean((reconstructions - dvae.unmap_pixels(images)) ** 2, axis=(1, 2, 3))
  vocab = logits.shape[-1]
  sums = {
      "images": jnp.asarray(images.shape[0], jnp.float32),
      "mse": jnp.sum(mse),
      "psnr": jnp.sum(_psnr(mse)),
      "nll_per_dim": jnp.sum(reconstruction_nll(config, stats, images)) / math.prod(images.shape[1:]),
  }
  code_counts = jnp.bincount(jnp.argmax(logits, axis=-1).reshape(-1), length=vocab)
  pixels = jnp.round(reconstructions * 255.0).astype(jnp.uint8)
  return sums, code_counts, pixels


# ----------------------------------------------------------------------------- eval

@dataclasses.dataclass
class Evaluator:
  """Eval over the validation split with the EMA params: MSE, PSNR, codebook use, shapes oracle."""
  config: Any
  mesh: Any
  dataset: Any
  num_batches: int    # -1: the whole split (size unknown, one process)
  step_fn: Any

  @classmethod
  def create(cls, config, mesh, apply_fn, state_shardings, data_dir):
    dataset = pipeline.create_dataset(config, data_dir, None, train=False, split=config.eval_split)
    batches = int(dataset.cardinality())
    if batches < 0:
      if jax.process_count() > 1 and not config.eval_batches:
        raise ConfigError(f"config.eval_batches=0 (the whole split) needs a dataset of known size on "
                          f"{jax.process_count()} processes; set a number of batches")
      batches = config.eval_batches or -1
    elif config.eval_batches:
      batches = min(batches, config.eval_batches)
    if jax.process_count() > 1:  # every host must run the same number of global steps
      batches = int(multihost_utils.process_allgather(np.array(batches)).min())
    if batches == 0:
      raise ConfigError(f"config.eval_split={config.eval_split!r} holds less than one batch of "
                        f"{config.data.global_batch // jax.process_count()} per process")
    rules = config.logical_axis_rules
    step_fn = jax.jit(functools.partial(eval_step, config, apply_fn),
                      in_shardings=(state_shardings.ema_params, sharding.batch_sharding(mesh, rules)))
    return cls(config, mesh, dataset, batches, step_fn)

  def _host_rows(self, array):
    spec = PartitionSpec(sharding.batch_axes(self.config.logical_axis_rules) or None)
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, self.mesh, spec))

  def __call__(self, params, step, workdir):
    config = self.config
    start = time.perf_counter()
    totals, code_counts, oracle_scores, grid = {}, 0, [], None
    for index, local in enumerate(pipeline.DataIterator(self.dataset)):
      if index == self.num_batches:
        break
      batch = sharding.make_global_batch({"image": local["image"]}, self.mesh, config.logical_axis_rules)
      with sharding.mesh_and_rules(self.mesh, config.logical_axis_rules):
        sums, counts, pixels = self.step_fn(params, batch)
      totals = {k: totals.get(k, 0.0) + float(v) for k, v in jax.device_get(sums).items()}
      code_counts = code_counts + np.asarray(jax.device_get(counts))
      reconstructions = self._host_rows(pixels)
      originals = preprocess.unmap_pixels(local["image"], config.data.pixel_map)
      captions = [c.decode() if isinstance(c, bytes) else str(c) for c in local["caption"]]
      if config.data.name == "shapes":
        oracle_scores.extend(_oracle_scores(originals, reconstructions, captions))
      if grid is None:
        grid = (originals, reconstructions, captions)
    images = totals.pop("images", 0.0)
    if not images:
      raise ConfigError(f"config.eval_split={config.eval_split!r}: no eval batch was read")
    results = {k: v / images for k, v in totals.items()}
    used = code_counts > 0
    usage = code_counts / code_counts.sum()
    results["codes_used"] = float(used.mean())
    results["perplexity"] = float(np.exp(-np.sum(usage[used] * np.log(usage[used]))))
    results.update(_oracle_accuracy(oracle_scores))
    results["seconds"] = time.perf_counter() - start
    logging.info("eval at step %d on %d images of %s/%s", step, int(images), config.data.name,
                 config.eval_split)
    if jax.process_index() == 0 and grid is not None:
      _save_reconstruction_grid(*grid, os.path.join(workdir, GRID_DIR, f"step_{step:07d}.png"),
                                config.grid_images, config.grid_columns)
    return results


def _oracle_scores(originals, reconstructions, captions):
  """Per image: the shapes oracle on the reconstruction vs. the original's reading, and vs. the caption."""
  from mmjax.tools import shapes_oracle  # pylint: disable=g-import-not-at-top
  scores = []
  for original, reconstruction, caption in zip(originals, reconstructions, captions):
    match = shapes_oracle.score(reconstruction, shapes_oracle.describe(original))
    scores.append((match, shapes_oracle.score(reconstruction, caption)["all"]))
  return scores


def _oracle_accuracy(scores):
  """Fractions over this run's eval images, summed over hosts: `oracle_match` (all of count,
  colour, shape, size, relation agree with the oracle's reading of the original), each of those
  separately, and `oracle_caption` (the reconstruction shows what the caption says)."""
  from mmjax.tools import shapes_oracle  # pylint: disable=g-import-not-at-top
  keys = ("all", "count", "colour", "shape", "size", "relation")
  if not scores and jax.process_count() == 1:
    return {}
  local = shapes_oracle.accuracy(match for match, _ in scores)
  counts = np.array([len(scores)] + [local.get(k, 0.0) * len(scores) for k in keys]
                    + [sum(by_caption for _, by_caption in scores)], np.float64)
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).sum(axis=0)
  if not counts[0]:
    return {}
  fractions = counts[1:] / counts[0]
  results = {f"oracle_{k}": float(v) for k, v in zip(keys[1:], fractions[1:])}
  results["oracle_match"] = float(fractions[0])
  results["oracle_caption"] = float(fractions[-1])
  return results


def _save_reconstruction_grid(originals, reconstructions, captions, path, count, columns):
  """PNG: rows of originals (with captions) each above the row of their reconstructions."""
  count = min(count, len(originals))
  images, labels = [], []
  for start in range(0, count, columns):
    stop = min(start + columns, count)
    images += list(originals[start:stop]) + list(reconstructions[start:stop])
    labels += captions[start:stop] + ["reconstruction"] * (stop - start)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image_grid.save_grid(np.stack(images), labels, path, columns=min(columns, count))


# ----------------------------------------------------------------------------- loop

def run(config, workdir):
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  rules = config.logical_axis_rules

  # Mesh.
  mesh = sharding.create_mesh(config.mesh)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)
  logging.info("%d microbatches per update", accumulate.accumulation_steps(config, mesh))

  # Data: this host's part of every global batch; images only. TFDS sets are built once, on
  # process 0, while the other hosts wait.
  data_dir = workdir_lib.prepare_data(config, workdir)
  train_iterator = pipeline.DataIterator(pipeline.create_dataset(config, data_dir, None, train=True))

  # Model and sharded state (restored from the latest checkpoint when there is one).
  model = create_model(config)
  abstract, state_shardings, init_fn, init_rng = abstract_state(config, model, mesh)
  state, step, checkpoints = state_lib.restore_or_init(config, workdir, train_iterator, abstract, state_shardings,
                                                      init_fn, mesh, rules, init_rng, "dVAE")

  # Step and eval.
  train_step_fn = jit_train_step(config, state_shardings, mesh)
  evaluator = Evaluator.create(config, mesh, model.apply, state_shardings, data_dir)
  writer = metrics_lib.MetricWriter(workdir)

  # Loop.
  state, step, train_scalars, eval_scalars = state_lib.train_loop(
      config, state, step, train_iterator=train_iterator, train_step_fn=train_step_fn,
      make_batch=lambda local: sharding.make_global_batch({"image": local["image"]}, mesh, rules),
      mesh=mesh, rules=rules, evaluate=lambda state, step: evaluator(state.ema_params, step, workdir),
      writer=writer, checkpoints=checkpoints)

  # Export the EMA params so tools rebuild the model from model.json.
  checkpoints.wait()
  export_dir = os.path.join(workdir, EXPORT_DIR)
  checkpoint_lib.save_model(export_dir, state.ema_params,
                            dvae.model_config(model, image_size=config.data.image_size))
  checkpoints.close()
  writer.close()
  logging.info("Exported the EMA dVAE at step %d to %s", step, export_dir)
  return state_lib.TrainResult(state=state, step=step, train=train_scalars, eval=eval_scalars, export_dir=export_dir)
