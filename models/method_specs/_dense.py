"""Arithmetic the specs share: a per-token, per-KV-head figure summed over one rank's layers and
KV heads (KV heads split over tensor parallelism, at least one per rank)."""


def per_rank(model, tp: int, per_head_token_bytes):
    heads = max(1, model.num_kv_heads // tp)
    return model.num_layers * heads * per_head_token_bytes
