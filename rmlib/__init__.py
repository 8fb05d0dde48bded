"""rmlib: reward-model robustness research library (BSR and GRM reproduced side by side).

Layers, bottom to top; each imports only from the layers listed before it (``tests/test_architecture.py``):

  core/             paths (env-configurable locations), atomic_io (atomic writes, resumable JSONL),
                    precision (bf16 only where native), runs (checkpoints, run identity, records)
  data/             loaders -> one pair schema, drop_report, DataError naming file/line/field;
                    exclusions (AlpacaEval generators left out)
  model/            assets (model resolver), encoding (chat templates, prompt cut from the LEFT),
                    reward_model (heads, fine-tuning modes, save/load), layers (decoder maths, no
                    I/O), bottom_store (frozen-bottom activations computed once), scoring (batched
                    scoring; score_texts = rmlib.score), decoding (the sampling engine: own decode
                    loop, preallocated KV cache, exact top-p, per-row seeds), generation (resumable
                    sample files on it), logprobs, score_cache (scores of samples, resumable)
  reward/           losses (registry, pure functions), config (RMConfig), trainer (RMTrainer,
                    train_reward_model), variants (bt, bsr, grm, bsr_grm, ... and the grid), cli
  rloo/             config (RLOORunConfig -> TRL RLOOConfig), prompts, reward_fn (an RM as a TRL
                    reward function), tracker (gold/proxy/KL/length records), trainer (train_rloo)
  analysis/         stats (bootstrap, tau-b, seed means), claims (the ONE set of verdict rules),
                    benchmarks, dispersion (BSR §4 norms + probe callback), scenarios (BSR Table 5),
                    bon (exact Best-of-N curves), synthetic_gold (gold, proxies, relabeling), bon_runs
                    (training, sampling and scoring them for notebook 04),
                    rloo_curves
  plots.py          every figure
  pipeline/         presets (the one reader of params/*.yaml), reproduce (`make reproduce`),
                    report (README results section, from the results manifest)
  run.py            `python -m rmlib.run NOTEBOOK -p NAME VALUE`: one notebook, checked parameters

The notebooks (``notebooks/``) call into ``analysis``, ``rloo``, ``reward`` and ``plots``; ``pipeline``
runs them. ``rmlib.score(rm, prompts, replies)`` scores texts with a saved reward model.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``rmlib.score``: ``rmlib.model.scoring.score_texts``, imported on first use so that
    ``import rmlib`` stays light (no torch or transformers)."""
    if name == "score":
        from rmlib.model.scoring import score_texts

        return score_texts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
