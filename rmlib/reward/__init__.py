"""Layer 3: reward-model training. Loss registry, ``RMConfig``, the trainer, named variants, the CLI."""
