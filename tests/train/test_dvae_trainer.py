"""The dVAE trainer end to end on a tiny config over 8 fake devices: loss, shardings, resume, export,
accumulation, AOT."""

import functools
import os

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common, dvae_openai, dvae_shapes
from mmjax.errors import ConfigError
from mmjax.input_pipeline import pipeline
from mmjax.models import dvae
from mmjax.train import accumulate, checkpoint
from mmjax.train import dvae as trainer
from mmjax.train import state as state_lib
from tests.train.trainer_utils import run_like_main, scalars

STEPS = 6


def tiny_config(data_dir, **fields):
  """16 px shapes → an 8×8 grid of 32 codes; params split 4 ways (fsdp), batch 8 ways (data × fsdp)."""
  config = dvae_shapes.get_config("shapes")
  config.mesh = common.mesh_config(data=2, fsdp=4)
  config.data.update(image_size=16, global_batch=16, num_examples=64, shuffle_buffer=32, data_dir=data_dir)
  config.model = dvae_shapes.model_config(n_hid=16, group_count=2, vocab_size=32, n_init=8)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=1, decay_steps=100)
  config.temperature.anneal_steps = 100
  config.kl.update(weight=0.5, warmup_steps=100)
  config.ema_decay = 0.5
  config.update(num_train_steps=STEPS, log_every_steps=1, eval_every_steps=100, eval_batches=2,
                checkpoint_every_steps=3, grid_images=4, grid_columns=4)
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = tiny_config(data_dir)
  return config, workdir, run_like_main(config, workdir)


def test_loss_falls_and_everything_is_logged(uninterrupted):
  _, workdir, result = uninterrupted
  assert result.step == STEPS
  loss = scalars(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  assert loss[STEPS] < loss[1] - 0.05, loss
  for tag in ("train/nll_per_dim", "train/kl_per_code", "train/temperature", "train/kl_weight",
              "train/learning_rate", "train/perplexity", "train/codes_used", "train/mse", "train/psnr",
              "eval/mse", "eval/psnr", "eval/codes_used", "eval/perplexity", "eval/oracle_match",
              "eval/oracle_caption"):
    assert STEPS in scalars(workdir, tag), tag
  assert 0 < result.eval["codes_used"] <= 1 and result.eval["psnr"] > 0
  np.testing.assert_allclose(result.eval["psnr"], scalars(workdir, "eval/psnr")[STEPS], rtol=1e-6)
  grid = tf.io.decode_png(tf.io.read_file(os.path.join(workdir, "reconstructions", f"step_{STEPS:07d}.png")))
  assert grid.shape[0] > 2 * 16 and grid.shape[1] > 4 * 16  # a row of originals above their reconstructions


def test_state_is_sharded_as_the_rules_say(uninterrupted):
  config, _, result = uninterrupted
  state = result.state
  conv = state.params["encoder"]["group_1_block_1"]["conv_1"]["kernel"]
  assert conv.shape == (3, 3, 16, 4)
  assert conv.sharding.spec == P(None, None, None, "fsdp")  # conv_out → fsdp
  assert conv.addressable_shards[0].data.shape == (3, 3, 16, 1)
  assert state.params["decoder"]["output"]["kernel"].sharding.spec == P(None, None, None, None)
  # The EMA and Adam's moments follow their params.
  assert state.ema_params["encoder"]["output"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  assert adam.mu["decoder"]["input"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  # Every leaf matches what the logical annotations and the config's rules give.
  mesh = sharding.create_mesh(config.mesh)
  _, expected, _, _ = trainer.abstract_state(config, trainer.create_model(config), mesh)
  for array, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert array.sharding.spec == want.spec


def test_resume_continues_bit_exactly(tmp_path, uninterrupted, data_dir):
  config, _, reference = uninterrupted
  first = run_like_main(tiny_config(data_dir, num_train_steps=STEPS // 2), tmp_path)
  assert first.step == STEPS // 2
  resumed = run_like_main(tiny_config(data_dir), tmp_path)
  assert resumed.step == STEPS
  assert sorted(scalars(str(tmp_path), "train/loss")) == list(range(1, STEPS + 1))
  # Same params, EMA, Adam moments and step as the run that never stopped: the data iterator,
  # the gumbel noise (keyed by step) and the schedules all continue where they left off.
  for got, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(reference.state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_export_loads_and_reconstructs(uninterrupted, data_dir):
  config, workdir, result = uninterrupted
  params, model_config = checkpoint.load_model(os.path.join(workdir, "dvae"), kind="dvae")
  assert model_config == dvae.model_config(trainer.create_model(config), image_size=16)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.ema_params)):
    np.testing.assert_array_equal(got, np.asarray(want))
  model = dvae.from_model_config(model_config)
  dataset = pipeline.create_dataset(config, data_dir, None, train=False, split="validation")
  errors = []
  for batch in dataset.take(config.eval_batches).as_numpy_iterator():
    tokens = model.apply({"params": params}, batch["image"], method=dvae.DVAE.encode_tokens)
    assert tokens.shape == (16, 8, 8) and tokens.max() < 32
    stats = model.apply({"params": params}, tokens, method=dvae.DVAE.decode_tokens)
    pixels = np.round(np.asarray(dvae.reconstruct_pixels(stats)) * 255) / 255
    errors.append(np.mean((pixels - np.asarray(dvae.unmap_pixels(batch["image"]))) ** 2, axis=(1, 2, 3)))
  # The trainer's eval measured the same images with the same EMA params (before uint8 rounding).
  np.testing.assert_allclose(np.mean(errors), result.eval["mse"], rtol=0.02)


def test_straight_through_codes_are_one_hot_with_the_relaxed_gradient():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  rows, rng = jnp.arange(2), jax.random.key(1)
  soft = trainer.gumbel_codes(logits, 0.5, rng, rows)
  hard = trainer.gumbel_codes(logits, 0.5, rng, rows, straight_through=True)
  np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(soft, axis=-1), 8))
  weights = jax.random.normal(jax.random.key(2), logits.shape)
  grad = lambda st: jax.grad(lambda l: jnp.sum(weights * trainer.gumbel_codes(l, 0.5, rng, rows, st)))(logits)
  assert float(jnp.abs(grad(False)).max()) > 1e-3
  np.testing.assert_allclose(grad(True), grad(False), rtol=1e-6)


def test_schedules_follow_the_paper():
  config = dvae_openai.get_config()
  assert (config.likelihood, config.straight_through, config.usage_weight) == ("logit_laplace", False, 0.0)
  temperature = trainer.temperature_schedule(config)
  anneal = config.temperature.anneal_steps
  assert anneal == 150_000 and float(temperature(0)) == 1.0
  np.testing.assert_allclose(temperature(anneal // 2), (1 + 1 / 16) / 2, rtol=1e-5)
  np.testing.assert_allclose([temperature(anneal), temperature(10 * anneal)], 1 / 16, rtol=1e-6)
  kl_weight = trainer.kl_weight_schedule(config)
  assert config.kl.warmup_steps == 5000 and float(kl_weight(0)) == 0.0
  np.testing.assert_allclose([kl_weight(2500), kl_weight(5000), kl_weight(10**6)], [3.3, 6.6, 6.6], rtol=1e-6)
  learning_rate = trainer.learning_rate_schedule(config)
  opt = config.optimizer
  assert float(learning_rate(0)) == 0.0
  np.testing.assert_allclose(learning_rate(opt.warmup_steps), opt.learning_rate, rtol=1e-6)
  np.testing.assert_allclose(learning_rate(opt.decay_steps), opt.end_learning_rate, rtol=1e-5)
  assert learning_rate(opt.decay_steps // 2) < opt.learning_rate / 2 + opt.end_learning_rate


@pytest.mark.parametrize("field, value, match", [
    ("num_train_steps", 0, r"config\.num_train_steps"),
    ("data.pixel_map", "unit", r"config\.data\.pixel_map"),
    ("data.image_size", 18, r"config\.data\.image_size: 18 is not divisible by .* = 4"),
    ("likelihood", "laplace", r"config\.likelihood: expected 'logit_laplace' or 'gaussian', got 'laplace'"),
    ("gaussian_scale", 0.0, r"config\.gaussian_scale: must be positive"),
    ("usage_weight", -0.1, r"config\.usage_weight: must be >= 0"),
    ("accumulation_steps", -1, r"config\.accumulation_steps: must be >= 1, or 0"),
    ("accumulation_dtype", "float16", r"config\.accumulation_dtype: expected 'float32' or 'bfloat16', got 'float16'"),
])
def test_bad_training_fields_are_named(field, value, match):
  config = dvae_shapes.get_config("shapes")
  config.model.group_count = 3
  parent, _, leaf = field.rpartition(".")
  (config[parent] if parent else config)[leaf] = value
  with pytest.raises(ConfigError, match=match):
    trainer.check_config(config)


def test_accumulation_fields_are_named(data_dir):
  with pytest.raises(ConfigError, match=r"config\.microbatch_per_shard: must be positive when "
                                        r"config\.accumulation_steps=0, got 0"):
    trainer.check_config(tiny_config(data_dir, accumulation_steps=0, microbatch_per_shard=0))
  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=4))  # 8 batch shards
  assert accumulate.accumulation_steps(tiny_config(data_dir, accumulation_steps=0, microbatch_per_shard=1),
                                       mesh) == 2
  with pytest.raises(ConfigError, match=r"config\.microbatch_per_shard=3: .* 24 rows do not divide "
                                        r"config\.data\.global_batch=16"):
    trainer.aot_train_step(tiny_config(data_dir, accumulation_steps=0, microbatch_per_shard=3), mesh)
  with pytest.raises(ConfigError, match=r"config\.accumulation_steps=4: .* multiple of 32"):
    trainer.aot_train_step(tiny_config(data_dir, accumulation_steps=4), mesh)
  # The full-size config: 2 images per batch shard, here 512 / (2 × 8) microbatches.
  openai = dvae_openai.get_config()
  assert openai.data.global_batch == 512 and openai.model.remat
  assert accumulate.accumulation_steps(openai, sharding.create_mesh(openai.mesh)) == 32


def test_accumulation_gives_the_full_batch_gradient(data_dir):
  # The paper's recipe (what dvae_openai accumulates with). The codebook-use penalty is off: it is a
  # function of each microbatch's mean posterior, so it alone depends on the split.
  config = tiny_config(data_dir, likelihood="logit_laplace", straight_through=False, usage_weight=0.0)
  config.data.global_batch = 32
  config.kl.warmup_steps = 0  # β at full weight from step 0, so the KL term has a gradient too
  mesh, rules = sharding.create_mesh(config.mesh), config.logical_axis_rules
  model = trainer.create_model(config)
  abstract, shardings, init_fn, rng = trainer.abstract_state(config, model, mesh)
  state = trainer.create_sharded_state(init_fn, abstract, shardings, mesh, rules, rng)
  # Bright pixels: at init the decoder's location is near 0 < logit(pixel), so the NLL's gradient
  # has one sign everywhere. (Uniform noise images give gradients of random sign whose sums cancel
  # ~100-fold, and batch-size-dependent CPU conv rounding then shows at the 1e-4 level.)
  pixels = np.random.default_rng(0).uniform(0.6, 1.0, size=(32, 16, 16, 3)).astype(np.float32)
  batch = sharding.make_global_batch({"image": np.asarray(dvae.map_pixels(pixels))}, mesh, rules)
  results = {}
  with sharding.mesh_and_rules(mesh, rules):
    # 4 microbatches of 8 images (one per batch shard), summed in f32 (the bf16 sum is
    # tested with the DALL·E trainer, which shares mmjax.train.accumulate).
    for steps in (1, 4):
      gradients = jax.jit(functools.partial(trainer.gradients, config, mesh, steps, shardings.params),
                          compiler_options=state_lib.FAST_COMPILE)
      results[steps] = jax.device_get(gradients(state, batch))
  (full, full_metrics), (accumulated, accumulated_metrics) = results[1], results[4]
  largest = max(np.abs(g).max() for g in jax.tree.leaves(full))
  assert largest > 1e-3
  assert 1 < full_metrics["perplexity"] <= 32 and 0 < full_metrics["codes_used"] <= 1
  # The same gradient and metrics up to float rounding: the gumbel noise of each image is keyed by
  # its row in the batch, not by its microbatch.
  for name in ("loss", "nll_per_dim", "kl_per_code", "mse", "psnr", "perplexity", "codes_used"):
    np.testing.assert_allclose(accumulated_metrics[name], full_metrics[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(optax.tree.norm(accumulated), optax.tree.norm(full), rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(accumulated), jax.tree.leaves(full)):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * largest, err_msg=jax.tree_util.keystr(path))


def test_aot_train_step_compiles_for_a_tpu_slice(data_dir):
  pytest.importorskip("libtpu", reason="AOT checks need libtpu (pip install 'mmjax[aot]')")
  config = tiny_config(data_dir, mesh=common.mesh_config(data=1, fsdp=-1))
  mesh = sharding.topology_mesh("v5e:2x2", config.mesh)
  step, abstract_args = trainer.aot_train_step(config, mesh)
  compiled = sharding.compile_for_mesh(step, abstract_args, mesh, config.logical_axis_rules)
  report = sharding.memory_report(compiled, "v5e:2x2", mesh.size)
  state, batch = abstract_args
  # Params, EMA and Adam's two moments are split over fsdp: each device holds at least its
  # quarter of them and of the batch (TPU tiling pads small arrays, so there is no tight upper bound).
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert report.argument_bytes >= 4 * param_bytes / 4 + batch["image"].size * 4 / 4
  split = [x.sharding.spec for x in jax.tree.leaves(state.params) if "fsdp" in str(x.sharding.spec)]
  assert len(split) >= len(jax.tree.leaves(state.params)) // 2
  assert report.fits
