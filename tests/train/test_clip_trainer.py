"""The CLIP trainer on tiny configs over 8 fake devices: loss, eval, resume, export, accumulation, AOT."""

import functools
import math
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mmjax import sharding, zeroshot
from mmjax.configs import clip_shapes, clip_vit_b32, common
from mmjax.errors import ConfigError
from mmjax.models import clip
from mmjax.train import clip as trainer
from tests.train.trainer_utils import run_like_main, scalars

STEPS = 6


def tiny_config(data_dir, **fields):
  """16 px shapes in 8 px patches, towers of width 32; params split 4 ways (fsdp), batch 8 ways."""
  config = clip_shapes.get_config("shapes")
  config.mesh = common.mesh_config(data=2, fsdp=4)
  config.model = clip_shapes.model_config(16, 8, 24, 64, width=32, layers=1, heads=2, embed_dim=16)
  config.tokenizer.vocab_size = 64
  config.data.update(image_size=16, global_batch=16, num_examples=64, shuffle_buffer=32, data_dir=data_dir)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=1, decay_steps=100)
  config.ema_decay = 0.5
  config.update(num_train_steps=STEPS, log_every_steps=1, eval_every_steps=100, eval_examples=100,
                checkpoint_every_steps=3)
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = tiny_config(data_dir)
  return config, workdir, run_like_main(config, workdir)


def test_loss_falls_and_eval_is_logged(uninterrupted):
  _, workdir, result = uninterrupted
  assert result.step == STEPS
  loss = scalars(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  assert loss[STEPS] < loss[1] - 0.1, loss
  for tag in ("train/image_to_text_loss", "train/text_to_image_accuracy", "train/logit_scale",
              "train/learning_rate", "train/grad_norm", "eval/image_to_text_recall_at_1",
              "eval/text_to_image_recall_at_5", "eval/zeroshot_top1", "eval/zeroshot_top5"):
    assert STEPS in scalars(workdir, tag), tag
  evaluation = result.eval
  assert 0 <= evaluation["zeroshot_top1"] <= evaluation["zeroshot_top5"] <= 1
  assert evaluation["image_to_text_recall_at_1"] <= evaluation["image_to_text_recall_at_5"]
  logged = scalars(workdir, "eval/zeroshot_top5")[STEPS]
  np.testing.assert_allclose(evaluation["zeroshot_top5"], logged, rtol=1e-6)


def test_state_is_sharded_as_the_rules_say(uninterrupted):
  config, _, result = uninterrupted
  params = result.state.params
  query = params["visual"]["transformer"]["blocks_0"]["attn"]["query"]["kernel"]
  assert query.shape == (32, 2, 16)   # [embed, heads, kv]
  assert query.sharding.spec == P("fsdp", "tensor", None)
  assert query.addressable_shards[0].data.shape == (32 // 4, 2, 16)
  mesh = sharding.create_mesh(config.mesh)
  _, expected, _, _ = trainer.abstract_state(config, trainer.create_model(config), mesh)
  for array, want in zip(jax.tree.leaves(result.state), jax.tree.leaves(expected)):
    assert array.sharding.spec == want.spec


@pytest.mark.slow
def test_resume_continues_bit_exactly(tmp_path, uninterrupted, data_dir):
  _, _, reference = uninterrupted
  first = run_like_main(tiny_config(data_dir, num_train_steps=STEPS // 2), tmp_path)
  assert first.step == STEPS // 2
  resumed = run_like_main(tiny_config(data_dir), tmp_path)
  assert resumed.step == STEPS and sorted(scalars(str(tmp_path), "train/loss")) == list(range(1, STEPS + 1))
  for got, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(reference.state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_export_loads_for_zero_shot(uninterrupted):
  config, workdir, result = uninterrupted
  encoder, tokenizer = zeroshot.load(os.path.join(workdir, "clip"), batch_size=16)
  assert tokenizer.vocab_size == 64 and encoder.model == trainer.create_model(config)
  for got, want in zip(jax.tree.leaves(encoder.params), jax.tree.leaves(result.state.ema_params)):
    np.testing.assert_array_equal(got, np.asarray(want))
  # The exported model and tokenizer reproduce the trainer's last zero-shot eval.
  accuracy = zeroshot.evaluate(encoder, tokenizer, "shapes", "test", text_length=config.data.text_length)
  np.testing.assert_allclose(accuracy["top5"], result.eval["zeroshot_top5"], atol=1e-6)


# ----------------------------------------------------------------------------- the step alone

def step_setup(accumulation_steps):
  config = tiny_config("/nonexistent", accumulation_steps=accumulation_steps)
  config.optimizer.update(warmup_steps=0, grad_clip_norm=0.0)
  mesh = sharding.create_mesh(config.mesh)
  model = trainer.create_model(config)
  abstract, shardings, init_fn, rng = trainer.abstract_state(config, model, mesh)
  state = trainer.create_sharded_state(init_fn, abstract, shardings, mesh, config.logical_axis_rules, rng)
  step = jax.jit(functools.partial(trainer.train_step, config, mesh))   # not donating: states are reused
  return config, mesh, state, step


@pytest.fixture(scope="module")
def full_batch_step():
  return step_setup(1)


def random_batch(rows=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 60, (rows, 24)).astype(np.int32)
  tokens[:, 10] = 63  # end of text
  return {"image": rng.normal(size=(rows, 16, 16, 3)).astype(np.float32), "text_tokens": tokens}


def test_accumulation_gives_the_full_batch_update(full_batch_step):
  """Gradient caching: 4 microbatches of 8 give the update of one batch of 32 (not 4 small losses)."""
  batch = random_batch()
  config, mesh, state, full_step = full_batch_step
  _, _, _, accumulated_step = step_setup(4)
  with sharding.mesh_and_rules(mesh, config.logical_axis_rules):
    full_state, full = full_step(state, batch)
    accumulated_state, accumulated = accumulated_step(state, batch)
  for name in ("loss", "image_to_text_accuracy", "grad_norm"):
    np.testing.assert_allclose(accumulated[name], full[name], rtol=1e-5, err_msg=name)
  learning_rate = config.optimizer.learning_rate
  moved = 0
  for got, want, before in zip(jax.tree.leaves(accumulated_state.params), jax.tree.leaves(full_state.params),
                               jax.tree.leaves(state.params)):
    if np.abs(np.asarray(want) - np.asarray(before)).max() > learning_rate / 2:
      moved += 1
      # Adam's first step moves a param by lr·g/(|g|+ε): where g is a near-cancelling sum, the float
      # rounding of the two summation orders shows as up to ~1% of lr; 4 separate losses would move
      # params by O(lr).
      np.testing.assert_allclose(got, want, atol=learning_rate * 2e-2)
    # else: a gradient of pure rounding noise (e.g. key biases), which Adam rescales to any size
  # Adam's first step moves every param with a gradient by ~lr (key biases have none: softmax
  # ignores a per-query constant).
  assert moved >= len(jax.tree.leaves(state.params)) - 4
  # The average of 4 separate 8-pair losses is a different objective: this test tells them apart.
  model = trainer.create_model(config)
  image_embeddings, text_embeddings, scale = model.apply({"params": state.params}, batch["image"],
                                                         batch["text_tokens"])
  loss_of = trainer.contrastive.contrastive_loss
  small = [float(loss_of(image_embeddings[i::4], text_embeddings[i::4], scale)[0]) for i in range(4)]
  assert abs(np.mean(small) - float(full["loss"])) > 0.3, (small, full["loss"])


def test_logit_scale_is_clamped_after_the_update(full_batch_step):
  config, mesh, state, step = full_batch_step
  params = dict(state.params, logit_scale=state.params["logit_scale"] * 0 + math.log(100.0) + 0.5)
  with sharding.mesh_and_rules(mesh, config.logical_axis_rules):
    new_state, scalars_ = step(state.replace(params=params), random_batch())
  assert float(new_state.params["logit_scale"]) == pytest.approx(math.log(100.0), abs=1e-6)
  assert float(scalars_["logit_scale"]) == pytest.approx(100.0, rel=1e-5)


def test_no_weight_decay_on_gains_biases_embeddings_and_scale():
  model = trainer.create_model(tiny_config("/nonexistent"))
  mask = trainer.weight_decay_mask(clip.abstract_params(model))
  flat = {jax.tree_util.keystr(path, simple=True, separator="/"): decays
          for path, decays in jax.tree_util.tree_leaves_with_path(mask)}
  no_decay = sorted(name for name, decays in flat.items() if not decays)
  assert "logit_scale" in no_decay and "visual/class_embedding" in no_decay
  assert {"visual/positional_embedding", "text/positional_embedding", "text/token_embedding/embedding",
          "visual/ln_pre/scale", "text/transformer/blocks_0/attn/query/bias"} <= set(no_decay)
  decayed = {name for name, decays in flat.items() if decays}
  assert decayed == {name for name in flat if name.endswith("kernel") or name.endswith("projection")}


def test_learning_rate_warms_up_then_follows_a_cosine():
  config = clip_vit_b32.get_config()
  schedule = trainer.learning_rate_schedule(config)
  opt = config.optimizer
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(opt.warmup_steps), opt.learning_rate, rtol=1e-6)
  halfway = opt.warmup_steps + (opt.decay_steps - opt.warmup_steps) // 2
  np.testing.assert_allclose(schedule(halfway), opt.learning_rate / 2, rtol=1e-3)
  np.testing.assert_allclose(schedule(opt.decay_steps), 0.0, atol=1e-9)


@pytest.mark.parametrize("field, value, match", [
    ("data.text_layout", "dalle", r"config\.data\.text_layout"),
    ("data.pixel_map", "dvae", r"config\.data\.pixel_map"),
    ("data.image_size", 64, r"config\.data\.image_size: 64 differs from config\.model\.image_size=32"),
    ("accumulation_steps", 3, r"config\.accumulation_steps: 3 does not divide"),
    ("tokenizer.vocab_size", 1000, r"config\.tokenizer\.vocab_size"),
    ("zeroshot_split", "test", None),   # fine for shapes; refused for user data below
])
def test_bad_training_fields_are_named(field, value, match):
  config = clip_shapes.get_config("shapes")
  parent, _, leaf = field.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  if match is None:
    trainer.check_config(config)
    config.data.update(name="tfrecord", path="/data/*.tfrecord")
    config.eval_data_path = "/data/val-*.tfrecord"
    match = r"config\.zeroshot_split: data\.name='tfrecord' has no zero-shot task"
  with pytest.raises(ConfigError, match=match):
    trainer.check_config(config)


def test_microbatches_must_split_over_the_batch_shards():
  config = tiny_config("/nonexistent", accumulation_steps=2)   # 16 rows: 2 microbatches of 8, 8 shards
  mesh = sharding.create_mesh(config.mesh)
  trainer._check_microbatches(config, mesh)
  config.accumulation_steps = 4
  with pytest.raises(ConfigError, match=r"microbatches of 4 rows do not split over the 8 batch shards"):
    trainer._check_microbatches(config, mesh)


@pytest.mark.slow
def test_aot_train_step_compiles_for_a_tpu_slice():
  """The real step (gradient caching over 2 microbatches, sharded loss) compiles for a v5e:2x2 slice."""
  pytest.importorskip("libtpu", reason="AOT checks need libtpu (pip install 'mmjax[aot]')")
  config = tiny_config("/nonexistent", mesh=common.mesh_config(data=2, fsdp=2), accumulation_steps=2)
  mesh = sharding.topology_mesh("v5e:2x2", config.mesh)
  step, abstract_args = trainer.aot_train_step(config, mesh)
  compiled = sharding.compile_for_mesh(step, abstract_args, mesh, config.logical_axis_rules)
  report = sharding.memory_report(compiled, "v5e:2x2", mesh.size)
  state, batch = abstract_args
  assert batch["text_tokens"].sharding.spec == P(("data", "fsdp"))
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert report.argument_bytes >= 4 * param_bytes / 2   # params, EMA, two moments; split 2 ways at most
  assert report.fits
