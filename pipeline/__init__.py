"""Data stages of the pipeline: pull, manifest, split, augment, compare; shared audio and label helpers."""
