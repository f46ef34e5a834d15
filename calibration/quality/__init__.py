"""Negative samples (the paper's Algorithm 1): prompts fine under FP16 and broken under compression,
counted in per-sample benchmark scores."""
