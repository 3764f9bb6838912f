"""The train state every trainer shares: params, optimizer state, and an EMA of the params."""

import dataclasses
import time
from typing import Any

import jax
import optax
from absl import logging
from flax import struct
from flax.training import train_state

from mmjax import sharding
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import metrics as metrics_lib

# XLA:CPU options for code that runs once: skip LLVM's optimisation (minutes → seconds to compile).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class TrainState(train_state.TrainState):
  """flax's TrainState plus `ema_params`, an exponential moving average used for eval and export."""
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.999)

  def apply_gradients(self, *, grads, **kwargs):
    new = super().apply_gradients(grads=grads, **kwargs)
    decay = self.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, new.params)
    return new.replace(ema_params=ema)

  @classmethod
  def create(cls, *, apply_fn, params, tx, ema_decay=0.999, **kwargs):
    # Built from *boxed* params so the optimizer and EMA trees keep the logical annotations.
    return super().create(apply_fn=apply_fn, params=params, tx=tx, ema_params=params,
                          ema_decay=ema_decay, **kwargs)


def no_decay_mask(params, names=("bias", "scale", "embedding", "logit_scale")):
  """True for leaves that take weight decay: everything except gains, biases and embeddings."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  decays = [not any(getattr(k, "key", None) in names for k in path) for path, _ in flat]
  return jax.tree.unflatten(jax.tree.structure(params), decays)


def adamw(learning_rate, config, mask=no_decay_mask):
  """AdamW with the config's betas/weight decay, clipping, and no decay on gains/biases/embeddings
  (`mask`: params -> tree of bools, True where decay applies; e.g. no_decay_mask with more names)."""
  chain = []
  if config.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.get("eps", 1e-8),
                           weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*chain)


def learning_rate_schedule(config):
  """Linear warmup from 0 to `learning_rate`, cosine decay to `end_learning_rate` at `decay_steps`."""
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
      decay_steps=opt.decay_steps, end_value=opt.end_learning_rate)


def create_sharded_state(init_fn, abstract, shardings, mesh, rules, rng):
  """`sharding.create_sharded_state`, with the init compiled fast on CPU: it runs once, and XLA:CPU
  spends a minute optimising the threefry code of ~70 initialisers at its default level."""
  options = FAST_COMPILE if jax.default_backend() == "cpu" else None
  init_leaves = jax.jit(lambda r: jax.tree.leaves(sharding.unbox(init_fn(r))),
                        out_shardings=jax.tree.leaves(shardings), compiler_options=options)
  with sharding.mesh_and_rules(mesh, rules):
    leaves = init_leaves(rng)
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def restore_or_init(config, workdir, data_iterator, abstract, shardings, init_fn, mesh, rules, rng, what):
  """(state, step, the run's TrainCheckpoints): the latest checkpoint in the workdir (restoring the
  data iterator with it), else a new sharded state at step 0; `what` names the model in the log."""
  checkpoints = checkpoint_lib.TrainCheckpoints(workdir, max_to_keep=config.keep_checkpoints,
                                                save_interval_steps=config.checkpoint_every_steps)
  state, step = checkpoints.restore(abstract, data_iterator)
  if state is None:
    state = create_sharded_state(init_fn, abstract, shardings, mesh, rules, rng)
    logging.info("Initialised a new %s:\n%s", what, sharding.sharding_report(state.params))
  else:
    logging.info("Resumed from step %d in %s", step, checkpoints.directory)
  return state, step, checkpoints


def train_loop(config, state, step, *, train_iterator, train_step_fn, make_batch, mesh, rules, evaluate,
               writer, checkpoints, rates=None, after_step=None):
  """Updates from `step` to config.num_train_steps; returns (state, step, train scalars, eval scalars).

  Every config.log_every_steps the mean train scalars are written with steps/s and, for each
  `rates` entry (name → items per update), `<name>_per_second`. `evaluate(state, step)` (None: no
  eval) runs every config.eval_every_steps; its time is left out of the throughput. Checkpoints
  follow their own interval and the last step is always saved. `after_step(state, step, local)`
  runs after each update (e.g. sample grids), inside the mesh and rules.
  """
  train_scalars, eval_scalars, history = {}, {}, []
  last_log = (time.perf_counter(), step)
  while step < config.num_train_steps:
    local = next(train_iterator)
    batch = make_batch(local)
    with sharding.mesh_and_rules(mesh, rules):
      state, scalars = train_step_fn(state, batch)
    step += 1
    history.append(scalars)
    last_step = step == config.num_train_steps
    if step % config.log_every_steps == 0 or last_step:
      train_scalars = metrics_lib.mean_scalars(history)
      train_scalars["steps_per_second"] = (step - last_log[1]) / (time.perf_counter() - last_log[0])
      for name, per_step in (rates or {}).items():
        train_scalars[f"{name}_per_second"] = train_scalars["steps_per_second"] * per_step
      writer.write_scalars(step, train_scalars, prefix="train/")
      history, last_log = [], (time.perf_counter(), step)
    if evaluate is not None and (step % config.eval_every_steps == 0 or last_step):
      eval_scalars = evaluate(state, step)
      writer.write_scalars(step, eval_scalars, prefix="eval/")
      last_log = (time.perf_counter(), step)  # eval time is not training throughput
    if after_step is not None:
      with sharding.mesh_and_rules(mesh, rules):
        after_step(state, step, local)
    checkpoints.save(step, state, train_iterator, force=last_step)
  return state, step, train_scalars, eval_scalars


@dataclasses.dataclass
class TrainResult:
  """What a trainer's `run` leaves behind besides the workdir: the final state and the last metrics."""
  state: Any
  step: int
  train: dict
  eval: dict
  export_dir: str
