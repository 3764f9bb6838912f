"""The DALL·E transformer trainer on tiny configs over 8 fake devices: loss, shardings, resume,
gradient accumulation, token files, export, AOT."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common, dalle_12b, dalle_shapes
from mmjax.errors import ConfigError
from mmjax.input_pipeline import token_files
from mmjax.models import dalle
from mmjax.train import checkpoint
from mmjax.train import dalle as trainer
from mmjax.train import state as state_lib
from tests.train.trainer_utils import run_like_main, scalars

STEPS = 8
TEXT_VOCAB, TEXT_LENGTH, GRID, IMAGE_VOCAB = 40, 6, 4, 32
TEXT_ROWS = TEXT_VOCAB + TEXT_LENGTH


def tiny_config(**fields):
  """6 text + 16 image tokens, 2 layers (column, conv) of width 32; params split 4 ways (fsdp),
  the batch of 16 split 8 ways (data × fsdp); synthetic tokens; EMA on."""
  config = dalle_shapes.get_config("shapes")
  config.mesh = common.mesh_config(data=2, fsdp=4)
  config.model = dalle_12b.model_config(
      text_vocab_size=TEXT_VOCAB, text_length=TEXT_LENGTH, image_vocab_size=IMAGE_VOCAB, grid_size=GRID,
      width=32, num_layers=2, num_heads=4, kernel_size=3, attention_kernel="dense", remat=False,
      dtype="float32")
  config.data.update(source="synthetic", global_batch=16, synthetic_words=2, tokens_dir="")
  config.optimizer.update(learning_rate=1e-2, warmup_steps=1, decay_steps=100, end_learning_rate=1e-4)
  config.update(num_train_steps=STEPS, ema_decay=0.5, rng_impl="rbg", log_every_steps=1, eval_every_steps=4,
                eval_batches=1, checkpoint_every_steps=4, accumulation_steps=1)
  for name, value in fields.items():
    parent, _, leaf = name.rpartition("__")
    (config[parent] if parent else config)[leaf] = value
  return config


def adam_state(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = tiny_config()
  return config, workdir, run_like_main(config, workdir)


def test_loss_falls_and_everything_is_logged(uninterrupted):
  _, workdir, result = uninterrupted
  assert result.step == STEPS
  loss = scalars(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  # The head starts at zero: the first loss is exactly uniform over each modality's range.
  np.testing.assert_allclose(loss[1], math.log(TEXT_ROWS) / 8 + 7 * math.log(IMAGE_VOCAB) / 8, rtol=1e-5)
  assert loss[STEPS] < loss[1] - 0.3, loss
  image_loss = scalars(workdir, "train/image_loss")
  assert image_loss[STEPS] < image_loss[1] - 0.3, image_loss
  for tag in ("train/text_loss", "train/learning_rate", "train/grad_norm", "train/steps_per_second",
              "train/tokens_per_second", "eval/loss", "eval/text_loss", "eval/image_loss"):
    assert STEPS in scalars(workdir, tag), tag
  # The 8th update uses the rate at step 7: 6 steps into the cosine after a 1-step warmup.
  np.testing.assert_allclose(scalars(workdir, "train/learning_rate")[STEPS],
                             1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (STEPS - 2) / 99)), rtol=1e-4)
  # Eval (held-out synthetic rows, EMA params) sees the same rule the model learnt.
  assert result.eval["loss"] < loss[1] - 0.3 and sorted(scalars(workdir, "eval/loss")) == [4, 8]


def test_state_is_sharded_as_the_rules_say(uninterrupted):
  config, _, result = uninterrupted
  state = result.state
  fc = state.params["blocks"]["mlp"]["fc"]["kernel"]          # (layers, embed, mlp)
  assert fc.shape == (2, 32, 128) and fc.sharding.spec == P(None, "fsdp", "tensor")
  assert fc.addressable_shards[0].data.shape == (2, 8, 128)
  assert state.params["text_embedding"]["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert state.params["image_rows"].sharding.spec == P(None, "fsdp")
  assert state.ema_params["head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  adam = adam_state(state.opt_state)
  assert adam.mu["blocks"]["attn"]["query"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  mesh = sharding.create_mesh(config.mesh)
  _, expected, _, _ = trainer.abstract_state(config, trainer.create_model(config), mesh)
  for array, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert array.sharding.spec == want.spec


@pytest.mark.slow  # two more trainer runs (compiles + Orbax): ~40 s on an idle 2-core machine
def test_resume_continues_bit_exactly(tmp_path, uninterrupted):
  _, _, reference = uninterrupted
  first = run_like_main(tiny_config(num_train_steps=STEPS // 2), tmp_path)
  assert first.step == STEPS // 2
  resumed = run_like_main(tiny_config(), tmp_path)
  assert resumed.step == STEPS
  assert sorted(scalars(str(tmp_path), "train/loss")) == list(range(1, STEPS + 1))
  # Params, EMA, Adam moments and step equal the run that never stopped: data and schedule resumed.
  for got, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(reference.state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_accumulation_gives_the_full_batch_gradient():
  config = tiny_config(data__global_batch=32, ema_decay=0.0)
  mesh, rules = sharding.create_mesh(config.mesh), config.logical_axis_rules
  model = trainer.create_model(config)
  abstract, shardings, init_fn, rng = trainer.abstract_state(config, model, mesh)
  params = trainer.create_sharded_state(init_fn, abstract, shardings, mesh, rules, rng).params
  # A random head (it starts at zero) so that every parameter gets a gradient.
  head = np.random.default_rng(0).normal(scale=0.3, size=params["head"]["kernel"].shape).astype(np.float32)
  params["head"]["kernel"] = jax.device_put(head, params["head"]["kernel"].sharding)
  batch = trainer.global_batch(next(trainer.create_dataset(config, "", train=True).as_numpy_iterator()), mesh, rules)
  results = {}
  with sharding.mesh_and_rules(mesh, rules):
    # 4 microbatches of 8 rows (one per batch shard), summed in f32 and in bf16.
    for steps, dtype in ((1, "float32"), (4, "float32"), (4, "bfloat16")):
      step_config = tiny_config(data__global_batch=32, accumulation_steps=steps, accumulation_dtype=dtype)
      gradients = jax.jit(functools.partial(trainer.gradients, step_config, mesh, steps, shardings.params,
                                            model.apply), compiler_options=state_lib.FAST_COMPILE)
      results[steps, dtype] = jax.device_get(gradients(params, batch))
  full, full_metrics = results[1, "float32"]
  largest = max(np.abs(g).max() for g in jax.tree.leaves(full))
  assert largest > 1e-2
  # f32: the same gradient up to float rounding; bf16 sums round each partial sum to 8 bits.
  for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 1e-2)):
    accumulated, accumulated_metrics = results[4, dtype]
    for name in ("loss", "text_loss", "image_loss"):
      np.testing.assert_allclose(accumulated_metrics[name], full_metrics[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(optax.tree.norm(accumulated), optax.tree.norm(full), rtol=tolerance)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(accumulated), jax.tree.leaves(full)):
      assert got.dtype == np.float32
      np.testing.assert_allclose(got, want, rtol=10 * tolerance, atol=tolerance * largest,
                                 err_msg=f"{dtype} {jax.tree_util.keystr(path)}")


def test_caption_dropout_shows_some_rows_the_all_pad_caption():
  config = tiny_config(data__global_batch=32, ema_decay=0.0, caption_dropout=0.5)
  text = np.arange(1000 * TEXT_LENGTH, dtype=np.int32).reshape(1000, TEXT_LENGTH) % 7
  dropped = np.asarray(dalle.drop_captions(text, 0.5, trainer.caption_dropout_key(config, 3), config.model))
  pads = np.asarray(dalle.unconditional_text(config.model, 1))[0]
  replaced = (dropped == pads).all(axis=1)
  assert 400 < replaced.sum() < 600
  np.testing.assert_array_equal(dropped[~replaced], text[~replaced])
  # One key per update, the same on every call (every host draws the same rows).
  again = dalle.drop_captions(text, 0.5, trainer.caption_dropout_key(config, 3), config.model)
  other = dalle.drop_captions(text, 0.5, trainer.caption_dropout_key(config, 4), config.model)
  np.testing.assert_array_equal(again, dropped)
  assert (np.asarray(other) != dropped).any()

  # The train step scores the batch with those rows dropped: its loss is eval_step's on that batch.
  mesh, rules = sharding.create_mesh(config.mesh), config.logical_axis_rules
  model = trainer.create_model(config)
  abstract, shardings, init_fn, rng = trainer.abstract_state(config, model, mesh)
  state = trainer.create_sharded_state(init_fn, abstract, shardings, mesh, rules, rng)
  head = np.random.default_rng(0).normal(scale=0.3, size=state.params["head"]["kernel"].shape).astype(np.float32)
  state.params["head"]["kernel"] = jax.device_put(head, state.params["head"]["kernel"].sharding)
  local = next(trainer.create_dataset(config, "", train=True).as_numpy_iterator())
  with sharding.mesh_and_rules(mesh, rules):
    loss = lambda text: trainer.eval_step(config, model.apply, state.params, {**local, "text_tokens": text})  # noqa: E731
    expected = loss(dalle.drop_captions(local["text_tokens"], 0.5, trainer.caption_dropout_key(config, 0),
                                        config.model))
    undropped = loss(local["text_tokens"])
    # (The step donates the state: it runs last.)
    _, metrics = trainer.jit_train_step(config, shardings, mesh)(state, trainer.global_batch(local, mesh, rules))
  np.testing.assert_allclose(metrics["text_loss"], expected["text_loss"], rtol=1e-5)
  assert abs(float(metrics["text_loss"]) - float(undropped["text_loss"])) > 1e-3


def test_accumulation_steps_from_microbatch_per_shard():
  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=4))
  assert trainer.accumulation_steps(tiny_config(data__global_batch=64, accumulation_steps=0,
                                                microbatch_per_shard=2), mesh) == 4
  with pytest.raises(ConfigError, match=r"config.microbatch_per_shard=3: .* 24 rows do not divide "
                                        r"config.data.global_batch=64"):
    trainer.accumulation_steps(tiny_config(data__global_batch=64, accumulation_steps=0, microbatch_per_shard=3),
                               mesh)
  with pytest.raises(ConfigError, match=r"config.accumulation_steps=4: config.data.global_batch=16 does not split "
                                        r"into 4 microbatches .* multiple of 32"):
    trainer.accumulation_steps(tiny_config(accumulation_steps=4), mesh)


# ----------------------------------------------------------------------------- token files

def write_token_dir(directory, splits, grid=GRID, seed=0):
  """Hand-written encode-job output: {split: examples} on one host, one shard file each."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for split, examples in splits.items():
    with tf.io.TFRecordWriter(token_files.shard_path(directory, split, 0, 1, 0)) as writer:
      for i in range(examples):
        text = TEXT_VOCAB + np.arange(TEXT_LENGTH)   # per-position pads after two words
        text[:2] = rng.integers(0, TEXT_VOCAB, 2)
        image = (3 * text[np.arange(grid * grid) % 2] + np.arange(grid * grid)) % IMAGE_VOCAB
        writer.write(token_files.serialize_example(image, text, f"caption {i}"))
  token_files.write_json(os.path.join(directory, token_files.METADATA_FILE), {
      "format": token_files.FORMAT, "version": token_files.VERSION, "grid_height": grid, "grid_width": grid,
      "text_length": TEXT_LENGTH, "image_vocab_size": IMAGE_VOCAB, "text_vocab_size": TEXT_VOCAB,
      "text_layout": "dalle", "splits": {s: {"examples": n, "files": 1} for s, n in splits.items()}})
  return str(directory)


def test_token_files_train_eval_and_export(tmp_path):
  tokens = write_token_dir(tmp_path / "workdir" / "tokens", {"train": 48, "validation": 40})
  config = tiny_config(data__source="tokens", ema_decay=0.0, num_train_steps=3, eval_every_steps=3,
                       eval_batches=0, data__shuffle_buffer=64)
  result = run_like_main(config, tmp_path / "workdir")   # tokens_dir "" = <workdir>/tokens
  assert result.step == 3 and result.state.ema_params is None
  # The whole validation split: 40 rows make 2 batches of 16 (the partial third is dropped).
  assert set(result.eval) >= {"loss", "text_loss", "image_loss"}
  assert scalars(str(tmp_path / "workdir"), "eval/loss") == {3: pytest.approx(result.eval["loss"])}
  params, model_config = checkpoint.load_model(result.export_dir, kind="dalle")
  assert model_config == dalle.model_config(trainer.create_model(config))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(got, np.asarray(want))
  # The exported model rebuilds and scores the validation rows as the trainer's eval did.
  model = dalle.from_model_config(model_config)
  batches = list(trainer.create_dataset(config.copy_and_resolve_references(), str(tmp_path / "workdir"),
                                        train=False).as_numpy_iterator())
  assert len(batches) == 2 and os.path.samefile(trainer.tokens_dir(config, str(tmp_path / "workdir")), tokens)
  losses = [dalle.dalle_loss(model.apply({"params": params}, b["text_tokens"], b["image_tokens"],
                                         method=dalle.Dalle.prediction_logits),
                             b["text_tokens"], b["image_tokens"])[0] for b in batches]
  np.testing.assert_allclose(np.mean(losses), result.eval["loss"], rtol=1e-5)


def test_token_files_that_do_not_fit_the_model_are_refused(tmp_path):
  write_token_dir(tmp_path / "tokens", {"train": 16}, grid=3)
  config = tiny_config(data__source="tokens", data__tokens_dir=str(tmp_path / "tokens"))
  with pytest.raises(ConfigError, match=r"token files .*tokens do not fit config.model \(grid_height: files 3, "
                                        r"model 4, grid_width: files 3, model 4\)"):
    run_like_main(config, tmp_path / "workdir")


def test_no_validation_split_means_no_eval(tmp_path):
  write_token_dir(tmp_path / "tokens", {"train": 32})
  config = tiny_config(data__source="tokens", data__tokens_dir=str(tmp_path / "tokens"))
  assert trainer.create_dataset(config, str(tmp_path), train=False) is None


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value, match", [
    ("num_train_steps", 0, r"config\.num_train_steps"),
    ("data__source", "images", r"config\.data\.source: 'images' is not one of \('tokens', 'synthetic'\)"),
    ("ema_decay", 1.0, r"config\.ema_decay: must be in \[0, 1\)"),
    ("accumulation_dtype", "float16", r"config\.accumulation_dtype: expected 'float32' or 'bfloat16'"),
    ("eval_batches", 0, r"config\.eval_batches: synthetic tokens never end"),
    ("sample_every_steps", -1, r"config\.sample_every_steps: must be >= 0"),
    ("caption_dropout", 1.0, r"config\.caption_dropout: must be in \[0, 1\)"),
])
def test_bad_training_fields_are_named(field, value, match):
  with pytest.raises(ConfigError, match=match):
    trainer.check_config(tiny_config(**{field: value}))


def test_sample_hook_calls_mmjax_generate_every_sample_every_steps(monkeypatch, tmp_path):
  from mmjax import generate  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(generate, "training_samples", lambda **kwargs: calls.append(kwargs))
  config = tiny_config(sample_every_steps=4)
  trainer.check_config(config)
  text = np.zeros((16, TEXT_LENGTH), np.int32)
  for step in range(1, 9):
    trainer.sample_hook(config, str(tmp_path), "model", "params", step, text)
  assert [c["path"] for c in calls] == [str(tmp_path / "samples" / f"step_{s:07d}.png") for s in (4, 8)]
  assert calls[0]["seed"] == config.seed + 4 and calls[0]["text_tokens"] is text and calls[0]["params"] == "params"


def test_12b_recipe_follows_the_paper():
  config = dalle_12b.get_config()
  opt = config.optimizer
  assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.grad_clip_norm) == (0.9, 0.96, 1e-8, 4.5e-2, 4.0)
  assert (opt.learning_rate, opt.warmup_steps, config.data.global_batch) == (4.5e-4, 5000, 1024)
  schedule = trainer.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5000), schedule(opt.decay_steps)],
                             [0.0, 4.5e-4, 4.5e-4 / 32], rtol=1e-5)
  assert config.text_loss_weight == 1 / 8
  # No decay on gains, biases, embeddings and position tables; decay on every kernel.
  model = trainer.create_model(tiny_config())
  mask = trainer.weight_decay_mask(dalle.abstract_params(model))
  assert not mask["text_embedding"]["embedding"] and not mask["image_columns"] and not mask["ln_final"]["scale"]
  assert not mask["head"]["bias"] and mask["head"]["kernel"] and mask["blocks"]["attn"]["query"]["kernel"]


def test_moments_in_bfloat16_update_in_float32():
  params = {"w": jnp.ones((4,), jnp.float32)}
  tx = trainer.with_moment_dtype(optax.adam(0.1), "bfloat16")
  state = tx.init(params)
  assert adam_state(state).mu["w"].dtype == adam_state(state).nu["w"].dtype == jnp.bfloat16
  updates, state = tx.update({"w": jnp.full((4,), 3.0)}, state, params)
  # Adam's first step is −lr · sign(g), computed in f32 (from bf16 moments it would be off by 1e-3).
  assert updates["w"].dtype == jnp.float32
  np.testing.assert_allclose(updates["w"], -0.1, rtol=1e-5)
  assert adam_state(state).nu["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(adam_state(state).mu["w"], 0.3, rtol=1e-2)


def test_aot_train_step_compiles_for_a_tpu_slice():
  pytest.importorskip("libtpu", reason="AOT checks need libtpu (pip install 'mmjax[aot]')")
  # The 12B's code paths in small: splash attention, remat, scanned layers, accumulation, bf16.
  config = tiny_config(mesh=common.mesh_config(data=1, fsdp=-1), accumulation_steps=2, ema_decay=0.0,
                       optimizer__moment_dtype="bfloat16")
  config.model.update(attention_kernel="splash", remat=True, dtype="bfloat16")
  mesh = sharding.topology_mesh("v5e:2x2", config.mesh)
  step, abstract_args = trainer.aot_train_step(config, mesh)
  compiled = sharding.compile_for_mesh(step, abstract_args, mesh, config.logical_axis_rules)
  report = sharding.memory_report(compiled, "v5e:2x2", mesh.size)
  state, batch = abstract_args
  assert state.ema_params is None
  assert adam_state(state.opt_state).nu["head"]["kernel"].dtype == jnp.bfloat16
  # Params (f32) and both moments (bf16) are split over fsdp: each device holds at least its quarter.
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(state.params))
  assert report.argument_bytes >= (4 + 2 + 2) * param_bytes / 4 / 4
  assert batch["image_tokens"].shape == (16, 16)
  assert "fsdp" in str(state.params["blocks"]["mlp"]["proj"]["kernel"].sharding.spec)
  assert report.fits
