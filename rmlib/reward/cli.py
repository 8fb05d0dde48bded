"""Command-line training entry point: ``RMConfig`` flags + data flags -> ``train_reward_model``.

One process (plain python) or several (``accelerate launch``); the HF Trainer does the
distribution, nothing here is distributed code::

    python -m rmlib.reward.cli --backbone smollm2-135m-instruct --loss bsr --loss_params '{"lam": 1e-3}' \
        --n_train 1800 --n_eval 500 --output_dir runs/bsr
    accelerate launch --config_file params/accelerate/ddp.yaml --num_processes 8 -m rmlib.reward.cli \
        --backbone Qwen/Qwen2.5-0.5B-Instruct --loss bsr --loss_params '{"lam": 1e-3}' --output_dir runs/bsr_ddp

Every ``RMConfig`` field is a flag (``--help`` lists them); ``--loss_params`` takes JSON. The
data flags pick the pairs the way notebook 02 does: ``rmlib.data.load_source(source)`` then
``train_eval_split(n_train, n_eval, seed=split_seed)``. Rerunning the same command resumes
from the newest checkpoint in ``--output_dir``. The main process prints the final metrics as
one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from rmlib.data import load_source, train_eval_split
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import train_reward_model


@dataclass
class DataArgs:
    """Which pairs to train and evaluate on."""

    source: str = field(default="hh-rlhf", metadata={
        "help": "rmlib.data.load_source name (hh-rlhf, ...), hub id, or a .json/.jsonl/.parquet preference file"})
    n_train: int | None = field(default=None, metadata={"help": "training pairs; default: all not held out"})
    n_eval: int = field(default=500, metadata={"help": "held-out pairs scored after training (0: none)"})
    split_seed: int | None = field(default=None, metadata={
        "help": "seed of the train/held-out shuffle; default: --seed"})
    reuse: bool = field(default=False, metadata={
        "help": "return a finished run of the same config and data in --output_dir instead of training"})


def parser() -> HfArgumentParser:
    p = HfArgumentParser((RMConfig, DataArgs))
    # Gaps of HfArgumentParser (and bf16's "auto", below): it drops the default of a `str | list[str]` field
    # (report_to="none" would become None, refused) and the default_factory of a bool field (use_cpu, True
    # without CUDA, would become False). loss_params needs nothing: RMConfig parses its JSON text.
    factories = {f.name: f.default_factory for f in dataclasses.fields(RMConfig)
                 if f.default_factory is not dataclasses.MISSING}
    for action in p._actions:
        if action.dest == "report_to" and action.default is None:
            action.default = [RMConfig.report_to]
        elif action.dest in factories and action.nargs == "?":  # bool fields
            action.default = factories[action.dest]()
        elif action.dest == "bf16":  # bool | "auto" (rmlib.core.precision)
            action.type = _bool_or_auto
            action.help = "true | false | auto (default: bf16 where bf16 matmuls are native)"
    return p


def _bool_or_auto(value: str) -> bool | str:
    v = str(value).strip().lower()
    if v == "auto":
        return "auto"
    if v in ("true", "yes", "t", "y", "1"):
        return True
    if v in ("false", "no", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}")


_bool_or_auto.__name__ = "bf16 value"


def main(argv: list[str] | None = None) -> dict:
    config, data = parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if config.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pairs = load_source(data.source)
    if pairs.drops.total:
        logging.getLogger(__name__).info("%s: %d rows dropped %s", data.source, pairs.drops.total, dict(pairs.drops.counts))
    seed = config.seed if data.split_seed is None else data.split_seed
    train, held_out = train_eval_split(pairs.dataset, data.n_train, data.n_eval, seed=seed)
    result = train_reward_model(config, train, held_out if data.n_eval else None, reuse=data.reuse)
    if config.process_index == 0:
        print(json.dumps({"final_dir": str(result.final_dir), **result.metrics}, default=str), flush=True)
    return result.metrics


if __name__ == "__main__":
    main(sys.argv[1:])
