"""Every test runs on the CPU with 8 fake devices, so sharding is exercised without a TPU."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 8)
