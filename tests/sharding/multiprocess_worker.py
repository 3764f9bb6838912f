"""One of two CPU processes for tests/sharding/test_multiprocess.py (run as a module).

  python -m tests.sharding.multiprocess_worker PORT PROCESS_ID

Joins a 2-process jax.distributed run (4 CPU devices each), feeds its own local batch into
make_global_batch and prints one JSON line with what the global arrays look like from here.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

LOCAL_ROWS, FEATURES = 4, 3


def local_batch(process_id):
  """Different data on each host: process p's rows hold 100·p + 0, 1, 2, ..."""
  return (np.arange(LOCAL_ROWS * FEATURES, dtype=np.float32).reshape(LOCAL_ROWS, FEATURES)
          + 100.0 * process_id)


def main(port, process_id):
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

  from mmjax import sharding  # pylint: disable=g-import-not-at-top
  from mmjax.configs import common  # pylint: disable=g-import-not-at-top

  rules = common.DEFAULT_LOGICAL_AXIS_RULES
  mesh = sharding.create_mesh(common.mesh_config(data=-1))
  batch = sharding.make_global_batch({"x": local_batch(process_id)}, mesh, rules)
  x = batch["x"]
  row_weights = jnp.arange(x.shape[0], dtype=jnp.float32)[:, None]
  total, weighted = jax.jit(lambda a: (jnp.sum(a), jnp.sum(a * row_weights)))(x)
  local_shard_rows = sorted(int(s.index[0].start) for s in x.addressable_shards)
  print(json.dumps({
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "device_count": jax.device_count(), "global_shape": list(x.shape), "spec": str(x.sharding.spec),
      "sum": float(total), "weighted_sum": float(weighted), "local_shard_rows": local_shard_rows,
      "process_batch_size": sharding.process_batch_size(8, mesh, rules),
  }), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
