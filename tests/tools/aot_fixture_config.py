"""Config for the test-only AOT trainer (tests/tools/aot_fixture.py).

  python -m mmjax.tools.aot --config=tests/tools/aot_fixture_config.py:tiny --topology=v5e:2x2

ARG: tiny (fits anywhere) | huge (two 64k×64k f32 kernels + AdamW: ~24 GiB per v5e chip).
"""

import ml_collections

from mmjax.configs import common

SIZES = {"tiny": (128, 256), "huge": (65536, 65536)}


def get_config(arg="tiny"):
  config = common.base_config()
  config.trainer = "tests.tools.aot_fixture"
  config.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
  embed, mlp = SIZES[arg]
  config.model = ml_collections.ConfigDict({"embed": embed, "mlp": mlp})
  config.data = ml_collections.ConfigDict({"global_batch": 32})
  config.learning_rate = 1e-3
  return config
