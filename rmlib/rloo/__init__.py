"""RLOO policy training against a learned reward model (BSR paper, Hong et al. ICML 2025, §3.2-3.3).

RLOO (REINFORCE Leave-One-Out, Ahmadian et al. ACL 2024) samples k completions y_1..y_k per
prompt x and updates the policy with the advantage

    A_i = R_i - (1 / (k - 1)) * sum_{j != i} R_j,   R_i = r_proxy(x, y_i) - beta * sum_t log(pi(y_it) / pi_ref(y_it)),

i.e. the proxy reward with a sequence-level KL penalty (first-order log-ratio, summed over the
completion's tokens) against the initial policy pi_ref. The loop is TRL's ``RLOOTrainer`` (not
re-implemented here): ``num_generations`` is k, ``beta`` the KL coefficient. The BSR paper uses
k = 2 and beta = 0.05 (Qwen2.5-1.5B SFT policy, lr 1e-6..2e-6, global batch 128, 5 epochs).

What this package adds (one module per job):

- ``reward_fn.RewardModelFunction``: an rmlib reward model (linear head, MLP head or GRM) as a TRL reward
  function. Each (prompt messages, completion) is formatted with the RM's OWN tokenizer and chat
  template exactly as Best-of-N scores samples (``rmlib.model.scoring.score_texts``: ``format_prompt``
  + ``format_reply``, prompt cut from the left at ``max_length``). Policy, proxy and gold tokenizers may all differ.
- ``prompts.build_prompt_sets``: a deterministic prompt pool (AlpacaEval instructions and HH-RLHF first
  human turns, the Best-of-N sources) split into training prompts and a fixed evaluation set,
  disjoint by text, with an ``exclude`` set (e.g. the RM-training prompts).
- ``tracker.RLOOTracker``: every ``track_every`` optimizer steps, on the fixed evaluation prompts:
  proxy reward, gold reward, KL to the initial policy, mean response length, gold win rate
  against the initial policy's answers. Records survive a kill and a resume.
- ``config.RLOORunConfig``: the run's settings, validated, and TRL's ``RLOOConfig`` built from them.
- ``shared_bottom.SharedBottomRLOOTrainer`` (mode ``topk``, Coste et al. 2024: only the policy's top
  ``policy_top_k_layers`` layers + final norm train): TRL's ``RLOOTrainer`` with one frozen-bottom
  forward per completion serving the policy and reference log-probs (the reference shares the
  bottom, ``shared_reference``) and a top-k proxy RM of the same backbone; sampling by ``DecodeLoop``.
- ``trainer.train_rloo``: the entry point (resumes from the newest complete checkpoint, reuses a
  finished run). Tables: ``rmlib.analysis.rloo_curves``; figure: ``rmlib.plots.rloo_curves_figure``.

KL estimators (the tracked ``kl`` and ``kl_k1``, nats per completion). For each evaluation prompt x,
m completions y ~ pi_T(.|x) are sampled (pi_T: the policy at temperature T; top_p = 1 keeps the
estimates exact), and with pi_ref the initial policy (LoRA: adapters disabled; full fine-tuning:
TRL's reference copy), over the completion's tokens including its end-of-turn token:

    kl_k1 = mean over (x, y) of sum_t [ log pi_T(y_t | x, y_<t) - log pi_ref,T(y_t | x, y_<t) ]
    kl    = mean over (x, y) of sum_t KL( pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t) )

Both are unbiased for E_x KL(pi_T(.|x) || pi_ref,T(.|x)) (chain rule of KL). ``kl_k1`` is the
plain log-prob difference of the sampled completion (TRL's penalty, summed); a single value can be
negative. ``kl`` uses the same forward passes but takes the exact KL over the vocabulary at every
sampled prefix: non-negative and of lower variance, so it is the curves' x axis. ``*_sem``: standard
errors over samples. Log-probs are computed in float32 even when training runs in bf16.

Evaluation samples use common random numbers: the completion (prompt p, sample s) draws from its
own ``torch.Generator`` seeded by hash(seed, p, s) at every tracked step (``rmlib.model.generation.RowSampler``):
the same uniforms drive a row's draws at every record, which couples consecutive records and
lowers the noise of step-to-step differences; and the global RNG that the training loop uses is
never touched (a resumed run samples the same training completions as an uninterrupted one).

Resume. ``<output_dir>/rloo_records.jsonl`` is rewritten atomically after each record and copied
into every ``checkpoint-N`` folder. A resumed run reloads the records of the checkpoint it resumes
from and drops newer ones, so its curves equal an uninterrupted run's. The training prompts are
laid out as one stream (``prompt_stream``: successive seeded permutations of the pool) read in
order, so resuming never depends on the sampler state of an epoch boundary. The run resumes from
the newest complete checkpoint (``trainer.CHECKPOINT_FILES``, ``rmlib.core.runs``); a checkpoint without
this run's identity file (another config, or a save cut short) is first moved to ``stale-<time>/``.
"""
