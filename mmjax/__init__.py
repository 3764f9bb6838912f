"""mmjax: DALL·E and CLIP in JAX/Flax, sharded for TPU pods."""
