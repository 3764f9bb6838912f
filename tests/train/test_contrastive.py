"""The sharded contrastive loss equals the plain B×B formula on 8 fake devices, gradients included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import sharding
from mmjax.configs import common
from mmjax.train import contrastive


def unit_rows(rng, rows, dim):
  x = rng.normal(size=(rows, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_loss(images, texts, scale):
  """The formula in float64 numpy, written independently of the jax code."""
  logits = scale * images.astype(np.float64) @ texts.astype(np.float64).T
  def cross_entropy(rows):
    shifted = rows - rows.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_softmax))
  return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


@pytest.mark.parametrize("data, fsdp, tensor", [(2, 4, 1), (8, 1, 1), (2, 2, 2)])
def test_sharded_loss_and_gradients_match_the_plain_formula(data, fsdp, tensor):
  mesh = sharding.create_mesh(common.mesh_config(data=data, fsdp=fsdp, tensor=tensor))
  axes = sharding.batch_axes(common.DEFAULT_LOGICAL_AXIS_RULES)   # ("data", "fsdp")
  rng = np.random.default_rng(data * 10 + fsdp)
  batch, dim = 32, 8
  images, texts = unit_rows(rng, batch, dim), unit_rows(rng, batch, dim)
  texts[:4] = images[:4]          # a few exact matches: positives that win their row and column
  scale = np.float32(14.0)
  batch_sharding = NamedSharding(mesh, P(axes))
  images_sharded = jax.device_put(images, batch_sharding)
  texts_sharded = jax.device_put(texts, batch_sharding)

  sharded = jax.jit(jax.value_and_grad(
      lambda i, t, s: contrastive.sharded_contrastive_loss(i, t, s, mesh, axes)[0], argnums=(0, 1, 2)))
  plain = jax.jit(jax.value_and_grad(lambda i, t, s: contrastive.contrastive_loss(i, t, s)[0],
                                     argnums=(0, 1, 2)))
  loss, grads = sharded(images_sharded, texts_sharded, scale)
  expected_loss, expected_grads = plain(images, texts, scale)
  np.testing.assert_allclose(loss, numpy_loss(images, texts, 14.0), rtol=1e-5)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.abs(grads[0]).max() > 1e-3 and abs(float(grads[2])) > 1e-4   # gradients are not trivially 0
  assert grads[0].sharding.spec == P(axes)  # the text/image gradients stay batch-sharded


def test_metrics_match_and_count_retrieved_pairs():
  mesh = sharding.create_mesh(common.mesh_config(data=2, fsdp=4))
  axes = ("data", "fsdp")
  rng = np.random.default_rng(3)
  images = unit_rows(rng, 16, 6)
  texts = images.copy()
  texts[5], texts[11] = images[11], images[5]   # two swapped captions: rows 5 and 11 miss
  _, metrics = jax.jit(functools.partial(contrastive.sharded_contrastive_loss, mesh=mesh, batch_axes=axes))(
      images, texts, 30.0)
  _, expected = contrastive.contrastive_loss(images, texts, 30.0)
  for name in expected:
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics["image_to_text_accuracy"], 14 / 16)
  np.testing.assert_allclose(metrics["text_to_image_accuracy"], 14 / 16)


def test_large_scales_stay_finite():
  """At the clipped scale of 100 every logit but the positive is far below it: no under/overflow."""
  mesh = sharding.create_mesh(common.mesh_config(data=8))
  rng = np.random.default_rng(4)
  images = unit_rows(rng, 16, 4)
  texts = -images                      # every positive pair is the *worst* match: huge loss, finite
  loss, _ = contrastive.sharded_contrastive_loss(jnp.asarray(images), jnp.asarray(texts), 100.0, mesh,
                                                 ("data",))
  assert np.isfinite(loss) and loss > 100
  np.testing.assert_allclose(loss, numpy_loss(images, texts, 100.0), rtol=1e-5)


def test_uneven_batch_is_refused():
  mesh = sharding.create_mesh(common.mesh_config(data=8))
  with pytest.raises(ValueError, match="does not split"):
    contrastive.sharded_contrastive_loss(jnp.ones((12, 4)), jnp.ones((12, 4)), 1.0, mesh, ("data",))


def test_retrieval_recall_with_repeated_captions():
  # Four images; captions 0, 1, 1, 2 (images 1 and 2 share one caption text).
  images = np.eye(4, 3, dtype=np.float32)[[0, 1, 1, 2]]
  images[3] = [0.0, 0.8, 0.6]          # image 3 lies closer to caption 1 than to its own (2)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  texts = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
  recall = contrastive.retrieval_recall(images, texts, np.array([7, 9, 9, 4]), ks=(1, 2))
  assert recall["image_to_text_recall_at_1"] == 0.75      # image 3 misses at k=1
  assert recall["image_to_text_recall_at_2"] == 1.0
  # Caption 2's nearest image is 3 (its own): hit; caption 1's nearest is image 1: hit.
  assert recall["text_to_image_recall_at_1"] == 1.0
