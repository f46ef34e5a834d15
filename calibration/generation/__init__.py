"""Real generations with SmolLM2-135M-Instruct under every method (our kernels as its attention),
recording response lengths; resumable and shardable (collect)."""
