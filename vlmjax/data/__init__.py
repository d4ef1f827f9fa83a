"""Data: the embedded shapes dataset, tfds sources and grain input pipelines."""
