"""bf16 "auto": bf16 autocast only where bf16 matmuls are native (rmlib.core.precision)."""

import pytest
import torch

from rmlib.core import precision


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("RMLIB_BF16", raising=False)


def test_explicit_values_are_kept():
    assert precision.resolve_bf16(True) is True
    assert precision.resolve_bf16(False) is False


def test_auto_follows_the_hardware_check(monkeypatch):
    for fast in (True, False):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device_type="cpu", fast=fast: fast)
        assert precision.resolve_bf16("auto", "cpu") is fast
        assert precision.resolve_bf16(None, "cpu") is fast


def test_cpu_check_agrees_with_onednn():
    assert precision.bf16_is_fast("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.bf16_is_fast("meta") is False


def test_env_overrides_auto_but_not_explicit(monkeypatch):
    monkeypatch.setenv("RMLIB_BF16", "1")
    assert precision.resolve_bf16("auto") is True
    assert precision.resolve_bf16(False) is False
    monkeypatch.setenv("RMLIB_BF16", "0")
    assert precision.resolve_bf16("auto") is False
    monkeypatch.setenv("RMLIB_BF16", "yes")
    with pytest.raises(ValueError, match="RMLIB_BF16='yes'"):
        precision.resolve_bf16("auto")


def test_bad_value_is_named():
    with pytest.raises(ValueError, match="bf16='fp16'.*True, False or 'auto'"):
        precision.resolve_bf16("fp16")


def test_configs_record_the_resolved_precision(monkeypatch, tmp_path):
    from rmlib.reward.config import RMConfig

    monkeypatch.setenv("RMLIB_BF16", "0")
    cfg = RMConfig(output_dir=str(tmp_path), backbone="smollm2-135m-instruct", use_cpu=True)
    assert cfg.bf16 is False and cfg.summary()["bf16"] is False
    monkeypatch.setenv("RMLIB_BF16", "1")
    cfg = RMConfig(output_dir=str(tmp_path), backbone="smollm2-135m-instruct", use_cpu=True)
    assert cfg.bf16 is True


def test_rloo_policy_dtype_auto(monkeypatch):
    from rmlib.rloo.config import RLOORunConfig

    monkeypatch.setenv("RMLIB_BF16", "1")
    assert RLOORunConfig(policy_dtype="auto", mode="lora", use_cpu=True).policy_dtype == "bfloat16"
    assert RLOORunConfig(policy_dtype="auto", mode="full", use_cpu=True).policy_dtype == "float32"
    monkeypatch.setenv("RMLIB_BF16", "0")
    cfg = RLOORunConfig(policy_dtype="auto", mode="lora", use_cpu=True)
    assert cfg.policy_dtype == "float32" and cfg.bf16 is False


def test_autocast_auto_is_off_where_bf16_is_slow(monkeypatch):
    from rmlib.core.precision import autocast

    monkeypatch.setenv("RMLIB_BF16", "0")
    x = torch.ones(2, 2)
    with autocast("cpu", "auto"):
        assert (x @ x).dtype == torch.float32
    with autocast("cpu", True):
        assert (x @ x).dtype == torch.bfloat16


def test_cli_bf16_takes_auto(monkeypatch):
    from rmlib.reward.cli import parser

    monkeypatch.setenv("RMLIB_BF16", "1")
    base = ["--backbone", "smollm2-135m-instruct", "--output_dir", "/tmp/rmlib-cli-test", "--source", "a.jsonl"]
    for extra, want in (([], True), (["--bf16", "auto"], True), (["--bf16", "false"], False), (["--bf16"], True)):
        assert parser().parse_args_into_dataclasses(base + extra)[0].bf16 is want, extra
    with pytest.raises(SystemExit):
        parser().parse_args_into_dataclasses(base + ["--bf16", "fp16"])
