"""Training through DeepSpeed ZeRO: the engine, the loop, crash-safe checkpoints and exact resume."""
