"""CLIP's symmetric contrastive loss over the global batch, sharded so no device holds B×B logits.

For unit-norm image embeddings I and text embeddings T ([B, D], row i a matching pair) and the
scale s = exp(logit_scale), the logits are L = s·I·Tᵀ and

    loss = ½ · mean_i(logsumexp_j L[i, j] − L[i, i])      image → text (rows)
         + ½ · mean_j(logsumexp_i L[i, j] − L[j, j])      text → image (columns)

`contrastive_loss` is that formula on one B×B matrix (the reference). `sharded_contrastive_loss`
computes the same number under `jax.shard_map` with the batch split over the mesh's batch axes
(b = B / devices rows each): every device gathers all texts and forms only its own b×B block of
rows. Rows are then complete locally; each column's logsumexp is combined across devices from
per-device partial sums (a `pmax` of B column maxima for stability, then a reduce-scatter of B
sums, so each device ends with the b columns of its own texts). One b×B matmul per device, where
gathering the images as well would cost two. Gradients flow through the collectives (the gather's
transpose is a reduce-scatter of the text gradients). At batch 32,768 over 64 devices a block is
512 × 32,768 f32 = 64 MiB instead of 4 GiB.

`retrieval_recall` scores image↔text retrieval on the host for eval.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


def contrastive_loss(image_embeddings, text_embeddings, logit_scale):
  """The reference: (loss, metrics) from the full B×B logits on one device."""
  logits = logit_scale * image_embeddings.astype(jnp.float32) @ text_embeddings.astype(jnp.float32).T
  positives = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
  loss = 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))
  metrics = {
      "image_to_text_loss": jnp.mean(image_to_text),
      "text_to_image_loss": jnp.mean(text_to_image),
      # A pair counts as retrieved when its logit is the row's (column's) maximum.
      "image_to_text_accuracy": jnp.mean(positives >= jnp.max(logits, axis=1)),
      "text_to_image_accuracy": jnp.mean(positives >= jnp.max(logits, axis=0)),
  }
  return loss, metrics


def sharded_contrastive_loss(image_embeddings, text_embeddings, logit_scale, mesh, batch_axes):
  """`contrastive_loss` with the batch split over `batch_axes` of `mesh` (each device: b × B logits).

  image_embeddings, text_embeddings: [B, D] global arrays (any sharding; shard_map places them);
  B must divide by the product of the batch axes' sizes. Returns (loss, metrics), replicated.
  """
  batch_axes = tuple(batch_axes)
  if not batch_axes:  # nothing to shard over: the plain formula is the same computation
    return contrastive_loss(image_embeddings, text_embeddings, logit_scale)
  devices = int(np.prod([mesh.shape[axis] for axis in batch_axes]))
  global_batch = image_embeddings.shape[0]
  if global_batch % devices:
    raise ValueError(f"sharded_contrastive_loss: batch {global_batch} does not split over mesh axes "
                     f"{batch_axes} ({devices} shards)")

  def local_loss(images, texts, scale):
    rows = images.shape[0]
    offset = jax.lax.axis_index(batch_axes) * rows
    all_texts = jax.lax.all_gather(texts, batch_axes, axis=0, tiled=True)
    logits = scale * images.astype(jnp.float32) @ all_texts.astype(jnp.float32).T   # [b, B]
    own = offset + jnp.arange(rows)
    positives = logits[jnp.arange(rows), own]                 # L[i, i] for this device's pairs
    row_max = jnp.max(logits, axis=1)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
    # Column logsumexp across devices: shift by the global column max (no gradient needed: the
    # result does not depend on the shift), sum the exponentials, keep this device's columns.
    column_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=0)), batch_axes)
    column_sums = jax.lax.psum_scatter(jnp.sum(jnp.exp(logits - column_max), axis=0), batch_axes,
                                       scatter_dimension=0, tiled=True)             # [b]
    own_column_max = jax.lax.dynamic_slice_in_dim(column_max, offset, rows)
    text_to_image = jnp.log(column_sums) + own_column_max - positives
    totals = jnp.stack([jnp.sum(image_to_text), jnp.sum(text_to_image),
                        jnp.sum(positives >= row_max), jnp.sum(positives >= own_column_max)])
    return jax.lax.psum(totals, batch_axes) / global_batch

  spec = PartitionSpec(batch_axes, None)
  means = jax.shard_map(local_loss, mesh=mesh, in_specs=(spec, spec, PartitionSpec()),
                        out_specs=PartitionSpec())(image_embeddings, text_embeddings,
                                                   jnp.asarray(logit_scale, jnp.float32))
  metrics = dict(zip(("image_to_text_loss", "text_to_image_loss", "image_to_text_accuracy",
                      "text_to_image_accuracy"), means))
  return 0.5 * (means[0] + means[1]), metrics


def retrieval_recall(image_embeddings, text_embeddings, caption_ids, ks=(1, 5)):
  """Image↔text recall@k on the host (numpy), for eval sets where captions may repeat.

  image_embeddings [N, D] and text_embeddings [N, D] are unit-norm pairs; caption_ids [N] says which
  rows share the *same caption text* (equal ids). Texts are deduplicated first, so a repeated
  caption is one gallery entry: image→text counts a hit when the image's caption is among the k
  captions nearest the image; text→image counts a hit for a caption when one of the k images
  nearest it carries that caption. Returns {"image_to_text_recall_at_k", "text_to_image_recall_at_k"}.
  """
  image_embeddings = np.asarray(image_embeddings, np.float32)
  caption_ids = np.asarray(caption_ids)
  unique_ids, first_row, caption_of_image = np.unique(caption_ids, return_index=True, return_inverse=True)
  similarity = image_embeddings @ np.asarray(text_embeddings, np.float32)[first_row].T   # [N, C]
  results = {}
  for k in ks:
    nearest_texts = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    hits = nearest_texts == caption_of_image[:, None]
    results[f"image_to_text_recall_at_{k}"] = float(np.mean(np.any(hits, axis=1)))
    nearest_images = np.argsort(-similarity.T, axis=1, kind="stable")[:, :k]           # [C, k]
    hits = caption_of_image[nearest_images] == np.arange(len(unique_ids))[:, None]
    results[f"text_to_image_recall_at_{k}"] = float(np.mean(np.any(hits, axis=1)))
  return results
