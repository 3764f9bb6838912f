"""The data preview job: dataset → tokenizer → per-host tf.data → global arrays on the mesh → PNG.

It runs every stage the trainers share, so `make demo` exercises the whole input side end to end.
"""

import json
import os

import jax
import numpy as np
from absl import logging

from mmjax import sharding
from mmjax.input_pipeline import pipeline, preprocess
from mmjax.train import image_grid, workdir as workdir_lib


def run(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(config.mesh)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

  data_dir = workdir_lib.prepare_data(config, workdir)  # before the tokenizer, which may read captions
  tokenizer = workdir_lib.ensure_tokenizer(config, workdir)
  dataset = pipeline.create_dataset(config, data_dir, tokenizer, train=True)
  local_batch = next(pipeline.DataIterator(dataset))

  arrays = {k: local_batch[k] for k in ("image", "text_tokens")}
  global_batch = sharding.make_global_batch(arrays, mesh, config.logical_axis_rules)
  for name, array in global_batch.items():
    logging.info("global %s: shape %s, %s, sharding %s", name, array.shape, array.dtype, array.sharding.spec)

  if jax.process_index() == 0:
    images = preprocess.unmap_pixels(local_batch["image"], config.data.pixel_map)
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in local_batch["caption"]]
    grid_path = os.path.join(workdir, "preview.png")
    image_grid.save_grid(np.asarray(images), captions, grid_path, columns=config.preview_columns)
    rows = [{"caption": c, "text_tokens": t.tolist(), "decoded": tokenizer.decode(t)}
            for c, t in zip(captions, local_batch["text_tokens"])]
    with open(os.path.join(workdir, "preview.json"), "w") as f:
      json.dump(rows, f, indent=1)
    logging.info("Wrote %s (%d images with captions)", grid_path, len(captions))
    print(f"Wrote {grid_path}")
