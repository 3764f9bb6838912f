"""tf.data input pipelines: TFDS builders, decoding, augmentation, tokenization, per-host sharding."""
