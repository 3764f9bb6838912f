"""The train state every trainer shares: params, optimizer state, and an EMA of the params."""

import dataclasses
from typing import Any

import jax
import optax
from flax import struct
from flax.training import train_state


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


@dataclasses.dataclass
class TrainResult:
  """What a trainer's `run` leaves behind besides the workdir: the final state and the last metrics."""
  state: Any
  step: int
  train: dict
  eval: dict
  export_dir: str
