"""Compile-only checks against TPU topologies: does a jitted step fit a pod slice's HBM?

With libtpu installed (`pip install 'mmjax[aot]'`), `jax.experimental.topologies` gives a slice's
TPU devices on a CPU-only machine; lowering a step with sharded `jax.ShapeDtypeStruct` inputs and
compiling it yields XLA's per-device memory analysis without any TPU.
"""

import contextlib
import dataclasses
import importlib.util
import os

from mmjax.errors import ConfigError
from mmjax.sharding import arrays as arrays_lib
from mmjax.sharding import mesh as mesh_lib
from mmjax.sharding import rules as rules_lib

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  device_kind: str                  # jax's Device.device_kind
  hbm_gib_per_chip: float
  devices_per_chip: int = 1         # v2/v3 expose each TensorCore as a device; v4/v5p are megacore
  accelerator_type: str = ""        # a valid single-host TPU_ACCELERATOR_TYPE, only to quiet libtpu's init
  topology_kwargs: tuple = ()       # extra get_topology_desc arguments

  @property
  def hbm_bytes_per_device(self):
    return int(self.hbm_gib_per_chip * GIB) // self.devices_per_chip


# Keyed by the prefix of topology names ("v5e:4x4"). HBM per chip from the Cloud TPU docs.
TPU_GENERATIONS = {
    "v2": TpuGeneration("TPU v2", 16, devices_per_chip=2, accelerator_type="v2-8"),
    "v3": TpuGeneration("TPU v3", 32, devices_per_chip=2, accelerator_type="v3-8"),
    "v4": TpuGeneration("TPU v4", 32, accelerator_type="v4-8",
                        topology_kwargs=(("chip_config_name", "megacore"),)),
    "v5e": TpuGeneration("TPU v5 lite", 16, accelerator_type="v5litepod-4"),
    "v5p": TpuGeneration("TPU v5", 95, accelerator_type="v5p-8"),
    "v6e": TpuGeneration("TPU v6 lite", 32, accelerator_type="v6e-4"),
}


def tpu_generation(topology):
  """The TpuGeneration of a topology name like 'v5e:4x4'; ConfigError for anything else."""
  generation, _, shape = topology.partition(":")
  if generation not in TPU_GENERATIONS or not shape:
    raise ConfigError(f"topology {topology!r}: expected GENERATION:SHAPE such as v5e:4x4 or v4:4x4x4, "
                      f"with GENERATION one of {', '.join(TPU_GENERATIONS)}")
  return TPU_GENERATIONS[generation]


def _require_libtpu():
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise ImportError("AOT compilation for TPU topologies needs libtpu, which is not installed: "
                      "pip install 'mmjax[aot]'")


@contextlib.contextmanager
def _quiet_libtpu_init(generation):
  """Off a TPU VM, libtpu's first init warns that TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES are
  unset (it looks for a local slice), and takes /tmp/libtpu_lockfile, which fails any other process
  compiling at the same time (parallel tests, two tools). Compile-only topologies need none of that,
  so harmless values are set for the call and removed after; a TPU VM (or a user's own values) is
  left alone."""
  added = []
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pylint: disable=broad-except
    chips = None  # cannot tell whether TPUs are attached: change nothing
  if chips == 0:
    for name, value in (("TPU_ACCELERATOR_TYPE", generation.accelerator_type),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
      if name not in os.environ:
        os.environ[name] = value
        added.append(name)
  try:
    yield
  finally:
    for name in added:
      os.environ.pop(name, None)


def topology_devices(topology, num_slices=1):
  """Compile-only TPU devices for a topology name ('v5e:2x2'); `num_slices > 1` gives multi-slice devices."""
  generation = tpu_generation(topology)
  if num_slices < 1:
    raise ConfigError(f"num_slices={num_slices}: expected a positive number of slices")
  _require_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = dict(generation.topology_kwargs)
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  try:
    with _quiet_libtpu_init(generation):
      return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split())
    if not message.startswith(("INVALID_ARGUMENT", "NOT_FOUND")):
      raise
    raise ConfigError(f"topology {topology!r}: libtpu cannot build it ({message})") from e


def topology_mesh(topology, mesh_config, num_slices=1):
  """The ("data", "fsdp", "tensor") mesh from `config.mesh` over a topology's compile-only devices."""
  return mesh_lib.create_mesh(mesh_config, topology_devices(topology, num_slices))


class DoesNotFitError(RuntimeError):
  """XLA refused to compile the step: it needs more HBM than a device has (the message says how much)."""


def compile_for_mesh(jitted, abstract_args, mesh, rules):
  """Lowers `jitted(*abstract_args)` (sharded ShapeDtypeStructs) under the mesh and rules; compiles.

  Raises DoesNotFitError when the TPU compiler runs out of HBM.
  """
  import jax  # pylint: disable=g-import-not-at-top
  with rules_lib.mesh_and_rules(mesh, rules):
    lowered = jitted.lower(*abstract_args)
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFitError(" ".join(str(e).split())) from e


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """XLA's per-device memory analysis of a compiled step against one chip generation's HBM."""
  topology: str
  device_kind: str
  num_devices: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int                  # outputs sharing a donated argument's buffer
  generated_code_bytes: int
  hbm_bytes: int                    # per device
  devices_per_chip: int = 1

  @property
  def total_bytes(self):
    """Per-device bytes live at the peak: arguments + outputs not aliased to them + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  @property
  def fits(self):
    return self.total_bytes <= self.hbm_bytes

  def table(self):
    per_chip = "" if self.devices_per_chip == 1 else f" ({self.devices_per_chip} devices per chip)"
    rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
            ("aliased (donated)", -self.alias_bytes), ("temporaries", self.temp_bytes),
            ("generated code", self.generated_code_bytes), ("total per device", self.total_bytes),
            ("HBM per device", self.hbm_bytes)]
    lines = [f"{self.topology}: {self.num_devices} x {self.device_kind}{per_chip}"]
    lines += [f"  {name:<18} {arrays_lib.format_bytes(value):>12}  {value:>16,d} B" for name, value in rows]
    verdict = "fits" if self.fits else "DOES NOT FIT"
    lines.append(f"  {verdict}: {100 * self.total_bytes / self.hbm_bytes:.1f}% of HBM per device")
    return "\n".join(lines)


def memory_report(compiled, topology, num_devices, hbm_gib=None):
  """MemoryReport from `compiled.memory_analysis()`; `hbm_gib` overrides the generation's HBM per device."""
  generation = tpu_generation(topology)
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"XLA gave no memory analysis for the step compiled for {topology}")
  hbm_bytes = int(hbm_gib * GIB) if hbm_gib else generation.hbm_bytes_per_device
  return MemoryReport(
      topology=topology, device_kind=generation.device_kind, num_devices=num_devices,
      argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
      temp_bytes=stats.temp_size_in_bytes, alias_bytes=stats.alias_size_in_bytes,
      generated_code_bytes=stats.generated_code_size_in_bytes, hbm_bytes=hbm_bytes,
      devices_per_chip=generation.devices_per_chip)
