"""Mesh construction, logical axis rules, shardings, global arrays and AOT compilation.

Models name logical axes only; this package maps them onto the ("data", "fsdp", "tensor") mesh
that `config.mesh` describes, using `config.logical_axis_rules`.
"""

from mmjax.sharding.aot import (
    DoesNotFitError,
    MemoryReport,
    TPU_GENERATIONS,
    TpuGeneration,
    compile_for_mesh,
    memory_report,
    topology_devices,
    topology_mesh,
    tpu_generation,
)
from mmjax.sharding.arrays import (
    abstract_global_batch,
    batch_axes,
    batch_sharding,
    format_bytes,
    make_global_batch,
    process_batch_size,
    sharding_report,
)
from mmjax.sharding.mesh import (
    MESH_AXES,
    count_slices,
    create_mesh,
    resolve_ici_dcn,
    resolve_mesh_shape,
)
from mmjax.sharding.rules import (
    check_divisible,
    logical_specs,
    logical_to_mesh_spec,
    logical_to_shardings,
    mesh_and_rules,
    normalize_rules,
    validate_rules,
)
from mmjax.sharding.state import abstract_sharded_state, create_sharded_state, unbox
