"""Two processes on CPU (``accelerate launch``, gloo) train exactly like one process.

One launch of ``tests/dist_scripts/dist_worker.py`` with ``params/accelerate/ddp.yaml`` and
``--num_processes 2`` (no GPU: RMConfig's ``use_cpu`` makes accelerate use CPU + gloo), one
launch of the CLI, and single-process reference runs in this pytest process; all float32.
(``accelerate launch --cpu --num_processes 2`` would start ONE process in accelerate 1.15: its
CPU path expects mpirun to start the others.)

What is exactly comparable. W = 2 processes, B = 2 pairs per process, the same seed, and the
``sequential`` sampler, so that optimizer step t sees pairs 4t..4t+3 in every run (accelerate
deals the sampler's batches of B round-robin: process 0 gets pairs 4t, 4t+1, process 1 4t+2, 4t+3):

- BT and GRM are per-pair means. DDP averages the W per-process gradients, so one step is the
  gradient of the mean over all W*B pairs: the same as one process with a batch of W*B pairs
  (checked for BT), or with B pairs and W gradient-accumulation steps, since the Trainer divides
  each micro-batch loss by W (checked for GRM).
- BSR per device (``global_batch`` false, as the official code): each process penalizes the mean
  of its own 2B rewards, and DDP averages: (1/W) sum_k [BT_k + lam mean_k^2]. That is one process
  with W accumulation steps of B pairs, NOT one batch of W*B pairs (the mean of squares is not
  the square of the mean); the tests check both statements.
- BSR global (``global_batch`` true): every process computes lam * (mean of all 2BW rewards)^2
  through an autograd all-gather, whose backward sums the W processes' (identical) gradients into
  the local slice: W times the single-process gradient, which DDP's 1/W averaging cancels. One
  step is then the gradient of BT + lam mean^2 over the W*B pairs: one process with W*B pairs.
  Checked with full fine-tuning and with top-k through the frozen-bottom store (rmlib.model.bottom_store).

Compared: the fp32 trainable weights of the last checkpoint (TOL; the doubled-batch twin pads
sequences to other lengths and sums in another order, the accumulation twins come out bitwise
equal here), the Trainer's logged loss per step, and the exported ``final/`` model (bf16 on disk)
loaded and scored on the held-out pairs. The two processes must end with bitwise equal weights.

Run time on 2 shared CPU cores: ~90 s, most of it the two launches. It runs in ``make test``;
``make test-dist`` runs these tests alone (marker ``dist``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from rmlib.core.paths import REPO_ROOT

pytestmark = pytest.mark.dist

ACCEL_DIR = REPO_ROOT / "params" / "accelerate"
SCRIPTS = Path(__file__).parent / "dist_scripts"
WORLD = 2
N_TRAIN, N_EVAL = 16, 4
STEPS = 3
TOL = dict(atol=2e-5, rtol=1e-4)  # fp32; seen: 0 for the accumulation twins, < 5e-6 for the doubled batch
SCORE_TOL = dict(atol=1e-3, rtol=1e-3)  # final/ is bf16 on disk: a weight can round to the neighbouring value

COMMON = dict(max_steps=STEPS, logging_steps=1, save_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3,
              warmup_steps=0, bf16=False, use_cpu=True, disable_tqdm=True, seed=0,
              train_sampling_strategy="sequential")
BSR_LAM = 0.5  # large, so that the penalty moves the weights well beyond the tolerance

# name -> (fields of the 2-process run, changes for the 1-process reference that must match it)
RUNS = {
    "bt": (dict(loss="bt"), dict(per_device_train_batch_size=2 * WORLD)),
    "bsr_device": (dict(loss="bsr", loss_params={"lam": BSR_LAM}), dict(gradient_accumulation_steps=WORLD)),
    "bsr_global": (dict(loss="bsr", loss_params={"lam": BSR_LAM, "global_batch": True}),
                   dict(per_device_train_batch_size=2 * WORLD)),
    "bsr_topk": (dict(loss="bsr", loss_params={"lam": BSR_LAM, "global_batch": True}, mode="topk", top_k_layers=1),
                 dict(per_device_train_batch_size=2 * WORLD)),  # through the bottom store (rmlib.model.bottom_store)
    "grm": (dict(regularizer="sft", alpha=0.1, mode="lora", lora_r=4, lora_dropout=0.0),  # no dropout: exact
            dict(gradient_accumulation_steps=WORLD)),
}
REPLIES = [
    ("Sure, here is a careful answer with details.", "No."),
    ("I can help with that safely.", "Figure it out yourself."),
    ("Here are three options to consider.", "Whatever."),
    ("Let me explain step by step.", "I won't."),
]


# ----------------------------------------------------------------------------------------------
# fixtures: the launches and the single-process references

def _accelerate_launch(config: Path, script_args: list[str], log: Path, cache: Path, timeout: int = 600) -> None:
    """``accelerate launch --config_file CONFIG --num_processes 2 ...`` on CPU; fails with the log tail.
    ``cache``: RMLIB_CACHE_DIR of the processes (the top-k bottom store goes there)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", RMLIB_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(WORLD), "--main_process_port", "0", *script_args]  # port 0: a free one
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text().splitlines() if "it/s]" not in ln]
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n" + "\n".join(lines[-60:]))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist_data") / "pairs.jsonl"
    rows = []
    for i in range(N_TRAIN + N_EVAL):
        c, r = REPLIES[i % len(REPLIES)]
        rows.append({"prompt": [{"role": "user", "content": f"Question number {i}?"}], "chosen": c, "rejected": r})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def split(pairs_file):
    from rmlib.data import load_preference_file, train_eval_split

    return train_eval_split(load_preference_file(pairs_file).dataset, N_TRAIN, N_EVAL, seed=0)


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, tiny_backbone, pairs_file):
    """Output folder of one 2-process launch of the worker (penalty check, then every run of RUNS)."""
    out = tmp_path_factory.mktemp("two_proc")
    runs_file = out / "runs.json"
    runs_file.write_text(json.dumps({name: {**COMMON, **fields} for name, (fields, _) in RUNS.items()}))
    _accelerate_launch(ACCEL_DIR / "ddp.yaml",
                       [str(SCRIPTS / "dist_worker.py"), "--out", str(out), "--backbone", tiny_backbone,
                        "--pairs", str(pairs_file), "--runs", str(runs_file),
                        "--n_train", str(N_TRAIN), "--n_eval", str(N_EVAL)],
                       out / "launch.log", cache=out / "cache")
    assert (out / "done").exists()
    return out


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, tiny_backbone, split):
    """name -> TrainResult of the single-process reference run of RUNS[name] (in this process)."""
    from rmlib.reward.config import RMConfig
    from rmlib.reward.trainer import train_reward_model

    out = tmp_path_factory.mktemp("one_proc")
    train, held_out = split
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RMLIB_CACHE_DIR", str(out / "cache"))  # its own bottom store, not the user's cache
        for name, (fields, reference) in RUNS.items():
            cfg = RMConfig(backbone=tiny_backbone, output_dir=str(out / name), **{**COMMON, **fields, **reference})
            results[name] = train_reward_model(cfg, train, held_out)
    return results


def _checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / f"checkpoint-{STEPS}" / "trainable.safetensors"))


def _initial_weights(backbone: str, fields: dict, out: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a run before its first step (same spec and seed as the run)."""
    from rmlib.model.reward_model import build_reward_model
    from rmlib.reward.config import RMConfig

    cfg = RMConfig(backbone=backbone, output_dir=str(out), **{**COMMON, **fields})
    return build_reward_model(cfg.model_spec, seed=cfg.seed).trainable_state_dict()


def _step_losses(log_history: list[dict]) -> list[float]:
    return [row["loss"] for row in log_history if "loss" in row and "step" in row]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_exported_with_weights(final: Path) -> None:
    files = sorted(p.name for p in final.iterdir())
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files), (
        f"{final} has no model weights ({files}): written last by a process other than rank 0 "
        "(under torch.distributed, transformers' save_pretrained writes weights on rank 0 only); "
        "train_reward_model must export from the main process only")


def _scores(final_dir: Path, held_out, tokenizer):
    from rmlib.model.encoding import encode_pairs
    from rmlib.model.reward_model import load_reward_model
    from rmlib.model.scoring import score_pairs

    enc, _ = encode_pairs(held_out, tokenizer, max_length=256)
    s = score_pairs(load_reward_model(final_dir), enc, bf16=False, progress=False, use_store=False)  # plain path
    return torch.tensor(s["chosen"]), torch.tensor(s["rejected"])


# ----------------------------------------------------------------------------------------------
# BSR's batch mean under DDP (a linear model on fixed inputs; see dist_worker.penalty_check)

@pytest.fixture(scope="module")
def penalty_records(two_proc):
    return [torch.load(two_proc / f"penalty_rank{r}.pt") for r in range(WORLD)]


def _linear_rewards(w: torch.Tensor, rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return rec["x_c"] @ w[0], rec["x_r"] @ w[0]  # (B,), (B,)


def test_global_penalty_equals_single_process_penalty_on_the_concatenated_batch(penalty_records):
    from rmlib.reward.losses import LossSpec, compute_loss

    lam, w0 = penalty_records[0]["lam"], penalty_records[0]["w0"]
    parts = [_linear_rewards(w0, rec) for rec in penalty_records]
    r_c, r_r = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (W*B,)
    _, single = compute_loss(LossSpec("bsr", {"lam": lam}), r_c, r_r)
    for rank, rec in enumerate(penalty_records):
        assert rec["world_size"] == WORLD and torch.equal(rec["w0"], w0)
        assert rec["global"]["penalty"] == pytest.approx(single["loss/penalty"], rel=1e-5, abs=1e-9), rank
        _, local = compute_loss(LossSpec("bsr", {"lam": lam}), *parts[rank])
        assert rec["device"]["penalty"] == pytest.approx(local["loss/penalty"], rel=1e-5, abs=1e-9), rank
        assert rec["global"]["bt"] == pytest.approx(local["loss/bt"], rel=1e-5)  # BT stays per device
    # the two modes really differ on these rewards
    assert abs(penalty_records[0]["device"]["penalty"] - penalty_records[0]["global"]["penalty"]) > 1e-3


def test_global_penalty_gradient_reaches_the_local_rewards_w_times_the_single_process_one(penalty_records):
    """Backward of the all-gather sums the W ranks' identical gradients into each local slice."""
    from rmlib.reward.losses import bsr

    lam, w0 = penalty_records[0]["lam"], penalty_records[0]["w0"]
    parts = [_linear_rewards(w0, rec) for rec in penalty_records]
    r_c = torch.cat([p[0] for p in parts]).requires_grad_(True)
    r_r = torch.cat([p[1] for p in parts]).requires_grad_(True)
    g_c, g_r = torch.autograd.grad(bsr(r_c, r_r, lam=lam), [r_c, r_r])  # single process, W*B pairs
    b = len(parts[0][0])
    for rank, rec in enumerate(penalty_records):
        local = torch.cat([g_c[rank * b:(rank + 1) * b], g_r[rank * b:(rank + 1) * b]])  # rank's [chosen; rejected]
        torch.testing.assert_close(rec["global"]["reward_grad"] / WORLD, local, atol=1e-7, rtol=1e-5)


def test_ddp_parameter_gradient_equals_the_single_process_gradient_in_both_modes(penalty_records):
    from rmlib.reward.losses import bsr

    lam, w0 = penalty_records[0]["lam"], penalty_records[0]["w0"]

    def grad(loss_fn):
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(w), [w])
        return g

    # global: BSR over the concatenated batch; per device: the mean over processes of each one's BSR
    def global_loss(w):
        parts = [_linear_rewards(w, rec) for rec in penalty_records]
        return bsr(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), lam=lam)

    def device_loss(w):
        return sum(bsr(*_linear_rewards(w, rec), lam=lam) for rec in penalty_records) / WORLD

    expected = {"global": grad(global_loss), "device": grad(device_loss)}
    for mode in ("global", "device"):
        got = [rec[mode]["param_grad"] for rec in penalty_records]
        assert torch.equal(got[0], got[1]), f"{mode}: the processes hold different averaged gradients"
        torch.testing.assert_close(got[0], expected[mode], atol=1e-6, rtol=1e-5, msg=mode)
    assert (expected["global"] - expected["device"]).abs().max() > 1e-2  # the test tells the modes apart


# ----------------------------------------------------------------------------------------------
# Trainer runs: BT, BSR (both modes; full and top-k), GRM

@pytest.mark.parametrize("name", list(RUNS))
def test_the_two_processes_end_with_identical_weights(two_proc, name):
    w0 = load_file(str(two_proc / name / "weights_rank0.safetensors"))
    w1 = load_file(str(two_proc / name / "weights_rank1.safetensors"))
    assert w0.keys() == w1.keys() and len(w0) > 0
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, f"{name}: ranks differ in {differ[:5]}"


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_like_one(two_proc, one_proc, tiny_backbone, tmp_path, name):
    """Checkpoint weights and per-step losses equal those of the matching single-process run (docstring)."""
    ref = one_proc[name]
    got, want = _checkpoint_weights(two_proc / name), _checkpoint_weights(ref.output_dir)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{name} {k}: {m}")
    # the checkpoint holds the weights the processes ended with, and training moved them
    assert _max_diff(got, load_file(str(two_proc / name / "weights_rank0.safetensors"))) == 0.0
    assert _max_diff(got, _initial_weights(tiny_backbone, RUNS[name][0], tmp_path)) > 1e-4
    log = json.loads((two_proc / name / "log_rank0.json").read_text())
    assert _step_losses(log) == pytest.approx(_step_losses(ref.log_history), rel=1e-5)
    assert len(_step_losses(log)) == STEPS


def test_bsr_modes_train_differently_and_per_device_is_not_one_big_batch(two_proc, one_proc):
    """Per-device BSR over 2 processes is not BSR on the 4-pair batch (that is the global mode)."""
    device, glob = _checkpoint_weights(two_proc / "bsr_device"), _checkpoint_weights(two_proc / "bsr_global")
    assert _max_diff(device, glob) > 1e-3
    assert _max_diff(device, _checkpoint_weights(one_proc["bsr_global"].output_dir)) > 1e-3


@pytest.mark.parametrize("name", list(RUNS))
def test_the_saved_checkpoint_loads_and_scores_like_a_single_process_one(two_proc, one_proc, split, name):
    final = two_proc / name / "final"
    _assert_exported_with_weights(final)
    ref = one_proc[name]
    got_c, got_r = _scores(final, split[1], ref.tokenizer)
    want_c, want_r = _scores(ref.final_dir, split[1], ref.tokenizer)
    torch.testing.assert_close(got_c, want_c, **SCORE_TOL)
    torch.testing.assert_close(got_r, want_r, **SCORE_TOL)


def test_a_linear_head_checkpoint_from_two_processes_loads_in_plain_transformers(two_proc, split, one_proc):
    from transformers import AutoModelForSequenceClassification

    from rmlib.model.encoding import encode_pairs, pad_sequences

    final = two_proc / "bt" / "final"
    _assert_exported_with_weights(final)
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    enc, _ = encode_pairs(split[1], one_proc["bt"].tokenizer, max_length=256)
    seqs = [list(r["prompt_ids"]) + list(r["chosen_ids"]) for r in enc]
    batch = pad_sequences(seqs, seqs, pad_token_id=model.config.pad_token_id, pad_to_multiple_of=None)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    want_c, _ = _scores(final, split[1], one_proc["bt"].tokenizer)
    torch.testing.assert_close(plain, want_c, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# the CLI under accelerate launch

def _cli_entry() -> list[str]:
    return ["-m", "rmlib.reward.cli"]


def _cli_flags(fields: dict) -> list[str]:
    flags = []
    for k, v in fields.items():
        flags += [f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v)]
    return flags


def test_cli_flags_default_to_rmconfig_defaults_and_take_loss_params_as_json(tmp_path):
    import dataclasses

    from rmlib.reward import cli
    from rmlib.reward.config import RMConfig

    out = str(tmp_path)
    cfg, data = cli.parser().parse_args_into_dataclasses(args=["--output_dir", out])
    ref = RMConfig(output_dir=out)
    differ = {f.name: (getattr(cfg, f.name), getattr(ref, f.name)) for f in dataclasses.fields(RMConfig)
              if getattr(cfg, f.name) != getattr(ref, f.name)}
    assert not differ  # HfArgumentParser alone gets report_to and use_cpu wrong
    assert data.source == "hh-rlhf" and data.n_train is None and data.split_seed is None
    cfg, _ = cli.parser().parse_args_into_dataclasses(
        args=["--output_dir", out, "--loss", "bsr", "--loss_params", '{"lam": 0.001, "global_batch": true}'])
    assert cfg.loss_spec.reward_kwargs == {"lam": 0.001, "global_batch": True}
    with pytest.raises(ValueError, match="lam"):  # validated like RMConfig(...)
        cli.parser().parse_args_into_dataclasses(
            args=["--output_dir", out, "--loss", "bsr", "--loss_params", '{"lambda": 0.001}'])
    for bad, message in (("{lam: 0.001}", "loss_params: not valid JSON"), ("[0.001]", "loss_params must be a JSON object")):
        with pytest.raises(ValueError, match=message):
            cli.parser().parse_args_into_dataclasses(args=["--output_dir", out, "--loss_params", bad])


def test_cli_under_accelerate_launch_trains_like_one_process(tmp_path, tiny_backbone, pairs_file, split, one_proc):
    """`accelerate launch --config_file params/accelerate/ddp.yaml -m rmlib.reward.cli --loss bsr
    --loss_params '{...}' ...` with global-batch BSR equals one process with the doubled batch."""
    fields, _ = RUNS["bsr_global"]
    out = tmp_path / "cli_run"
    _accelerate_launch(ACCEL_DIR / "ddp.yaml",
                       [*_cli_entry(), "--backbone", tiny_backbone, "--output_dir", str(out),
                        "--source", str(pairs_file), "--n_train", str(N_TRAIN), "--n_eval", str(N_EVAL),
                        *_cli_flags({**COMMON, **fields})],
                       tmp_path / "cli.log", cache=tmp_path / "cache")
    printed = [json.loads(ln) for ln in (tmp_path / "cli.log").read_text().splitlines() if ln.startswith('{"final_dir"')]
    assert len(printed) == 1, "only the main process prints the metrics"
    assert printed[0]["steps"] == STEPS and printed[0]["train_pairs"] == N_TRAIN
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["config"]["loss_params"] == {"lam": BSR_LAM, "global_batch": True}
    ref = one_proc["bsr_global"]
    got, want = _checkpoint_weights(out), _checkpoint_weights(ref.output_dir)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    _assert_exported_with_weights(out / "final")
    got_c, _ = _scores(out / "final", split[1], ref.tokenizer)
    want_c, _ = _scores(ref.final_dir, split[1], ref.tokenizer)
    torch.testing.assert_close(got_c, want_c, **SCORE_TOL)


# ----------------------------------------------------------------------------------------------
# the accelerate configs, as accelerate itself reads them (FSDP and DeepSpeed need GPUs to run)

def _launch_args(config: Path, extra: tuple[str, ...] = ()):
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name,kind,processes", [
    ("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 8), ("fsdp", "FSDP", 8), ("deepspeed_zero3", "DEEPSPEED", 8),
])
def test_every_accelerate_config_loads_and_leaves_precision_to_rmconfig(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCEL_DIR / f"{name}.yaml"))
    assert str(cfg.distributed_type).split(".")[-1] == kind and cfg.num_processes == processes
    # with RMConfig bf16 false, transformers would take a 'bf16' here and autocast anyway
    assert str(cfg.mixed_precision).split(".")[-1].lower() == "no" and not cfg.use_cpu
    assert sorted(p.stem for p in ACCEL_DIR.glob("*.yaml")) == ["ddp", "deepspeed_zero3", "fsdp", "single_gpu"]
    assert f"params/accelerate/{name}.yaml" in (ACCEL_DIR / "README.md").read_text()


def test_fsdp_config_shards_fully_and_wraps_each_decoder_layer_of_a_reward_model(monkeypatch, tokenizer):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    from rmlib.model.reward_model import ModelSpec, build_reward_model

    args, _ = _launch_args(ACCEL_DIR / "fsdp.yaml", ("--num_processes", "2"))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for k, v in env.items():
        if k.startswith("FSDP_") or k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as in each process
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2's full shard
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    model = build_reward_model(ModelSpec(), lm=make_tiny_lm(tokenizer, layers=3), seed=0)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [n for n, m in model.named_modules() if policy(m)]
    assert wrapped == [f"lm.model.layers.{i}" for i in range(3)]


def test_deepspeed_config_is_zero3_with_16bit_saving(monkeypatch):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args(ACCEL_DIR / "deepspeed_zero3.yaml", ("--num_processes", "2"))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    # left to RMConfig: a value here that differs from the Trainer's stops the run
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
