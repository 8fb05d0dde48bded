"""Worker of tests/test_dist.py, run in each of the processes of one ``accelerate launch``::

    accelerate launch --config_file params/accelerate/ddp.yaml --num_processes 2 \\
        tests/dist_scripts/dist_worker.py --out DIR --backbone TINY --pairs PAIRS.jsonl --runs RUNS.json

It only records what the processes computed, under ``--out``; tests/test_dist.py compares that
with single-process references. Everything runs on CPU (gloo), in float32.

1. ``penalty_rank<r>.pt``: BSR on rewards from a (B, 8) @ (8,) linear model wrapped in DDP by
   ``Accelerator.prepare``, in both modes: inputs, loss parts, d loss / d rewards, and the
   parameter gradient after DDP's averaging.
2. For each run of RUNS.json (name -> ``RMConfig`` fields): ``train_reward_model`` on the pairs
   of PAIRS.jsonl, as in the CLI; each process then writes its own trainable weights
   (``<name>/weights_rank<r>.safetensors``) and log history (``<name>/log_rank<r>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

torch.set_num_threads(1)  # two processes on a shared 2-core machine


def penalty_check(out: Path, lam: float = 0.5, b: int = 3, dim: int = 8) -> None:
    from accelerate import Accelerator

    from rmlib.reward.losses import LossSpec, compute_loss

    acc = Accelerator(cpu=True)
    rank = acc.process_index
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batch
    x_c, x_r = torch.randn(b, dim, generator=gen), torch.randn(b, dim, generator=gen) - 0.5
    record = {"rank": rank, "world_size": acc.num_processes, "x_c": x_c, "x_r": x_r, "lam": lam}
    for mode, global_batch in (("device", False), ("global", True)):
        torch.manual_seed(0)  # same init on every rank (DDP broadcasts rank 0's anyway)
        model = acc.prepare(torch.nn.Linear(dim, 1, bias=False))
        record["w0"] = acc.unwrap_model(model).weight.detach().clone()
        rewards = model(torch.cat([x_c, x_r])).squeeze(-1)  # (2B,)
        rewards.retain_grad()
        spec = LossSpec(reward="bsr", reward_params={"lam": lam, "global_batch": global_batch})
        loss, metrics = compute_loss(spec, rewards[:b], rewards[b:])
        acc.backward(loss)  # DDP: parameter gradients averaged over the processes
        record[mode] = {
            "loss": loss.detach(), "penalty": metrics["loss/penalty"], "bt": metrics["loss/bt"],
            "reward_grad": rewards.grad.detach().clone(),
            "param_grad": acc.unwrap_model(model).weight.grad.detach().clone(),
        }
    torch.save(record, out / f"penalty_rank{rank}.pt")


def train_runs(out: Path, backbone: str, pairs_file: str, runs: dict, n_train: int, n_eval: int) -> None:
    from safetensors.torch import save_file

    from rmlib.data import load_preference_file, train_eval_split
    from rmlib.reward.config import RMConfig
    from rmlib.reward.trainer import train_reward_model

    train, held_out = train_eval_split(load_preference_file(pairs_file).dataset, n_train, n_eval, seed=0)
    for name, fields in runs.items():
        config = RMConfig(backbone=backbone, output_dir=str(out / name), **fields)
        result = train_reward_model(config, train, held_out)
        rank = config.process_index
        save_file(result.model.trainable_state_dict(), str(out / name / f"weights_rank{rank}.safetensors"))
        (out / name / f"log_rank{rank}.json").write_text(json.dumps(result.log_history))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--runs", required=True, help="JSON file: run name -> RMConfig fields")
    p.add_argument("--n_train", type=int, default=16)
    p.add_argument("--n_eval", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    penalty_check(out)
    train_runs(out, args.backbone, args.pairs, json.loads(Path(args.runs).read_text()), args.n_train, args.n_eval)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "done").write_text("ok")


if __name__ == "__main__":
    main()
