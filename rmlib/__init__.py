"""rmlib: reward-model robustness research library (BSR and GRM reproductions).

Modules, one concept each:
  paths    -- where data, caches and runs live (env-configurable)
  assets   -- model resolver: short names, local paths, GGUF wheels, hub ids
  data     -- loaders for every preference source into one normalized schema
  losses   -- registry of reward losses and GRM text-generation regularizers
  models   -- reward model = causal-LM backbone + reward head (+ kept LM head)
  train    -- config dataclass + training entry point on top of HF Trainer
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``rmlib.score``: ``rmlib.model.scoring.score_texts``, imported on first use so that
    ``import rmlib`` stays light (no torch or transformers)."""
    if name == "score":
        from rmlib.model.scoring import score_texts

        return score_texts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
