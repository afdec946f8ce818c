"""Inference on new recordings: a trained run's models, the inputs they expect, timelines and output formats."""
