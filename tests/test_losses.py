"""rmlib.reward.losses: every loss and regularizer against hand computations on small explicit numbers.

Expected values use math.log / math.exp (log sigmoid(x) = -log(1 + e^-x)), never the function under
test; gradients come from autograd and are compared with hand-derived formulas.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from rmlib.reward import losses
from rmlib.reward.losses import (
    NEEDS_LOGP,
    NEEDS_REFERENCE,
    NEEDS_REJECTED_LOGP,
    REGULARIZERS,
    REWARD_LOSS_PARAMS,
    REWARD_LOSSES,
    LossSpec,
    assert_finite_loss,
    compute_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def T(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# The running example: B = 2 pairs, D = r_c - r_r = [1, -2]; all 2B rewards [1, 0, 0, 2], mean 0.75.
RC = (1.0, 0.0)
RR = (0.0, 2.0)
D = (1.0, -2.0)
B = 2
BT_VALUE = (-logsig(1.0) - logsig(-2.0)) / 2
BT_GRAD_C = T(*(-sig(-d) / B for d in D))  # dL/dr_c,i = -sigmoid(-D_i) / B
BT_GRAD_R = -BT_GRAD_C


def value_and_grads(fn, *xs: tuple[float, ...], **kw):
    """fn(*leaves, **kw) and the autograd gradient of every leaf."""
    leaves = [T(*x).requires_grad_() for x in xs]
    out = fn(*leaves, **kw)
    out.backward()
    return (out.detach(), *[leaf.grad for leaf in leaves])


class TestBT:
    def test_value_and_grad(self):
        v, gc, gr = value_and_grads(losses.bt, RC, RR)
        assert_close(v, torch.tensor(BT_VALUE))
        assert_close(gc, BT_GRAD_C)
        assert_close(gr, BT_GRAD_R)

    def test_computes_in_float32(self):
        out = losses.bt(T(*RC).bfloat16(), T(*RR).bfloat16())
        assert out.dtype == torch.float32
        assert_close(out, torch.tensor(BT_VALUE))
        assert losses.bt(T(*RC).double(), T(*RR).double()).dtype == torch.float32

    def test_shape_mismatch_raises(self):
        # (B, 1) head output next to (B,) would silently broadcast to (B, B)
        with pytest.raises(ValueError, match=r"shape \(B,\)"):
            losses.bt(T(*RC)[:, None], T(*RR))
        with pytest.raises(ValueError, match="B >= 1"):
            losses.bt(T(), T())


class TestBSR:
    def test_value(self):
        # penalty = lam * mean([1, 0, 0, 2])^2 = 0.1 * 0.75^2
        assert_close(losses.bsr(T(*RC), T(*RR), lam=0.1), torch.tensor(BT_VALUE + 0.1 * 0.75**2))
        assert_close(losses.bsr(T(*RC), T(*RR)), torch.tensor(BT_VALUE + 1e-3 * 0.75**2))  # default lam

    def test_penalty_gradient_is_the_same_for_every_reward(self):
        lam = 0.1
        _, gc, gr = value_and_grads(losses.bsr, RC, RR, lam=lam)
        shift = 2 * lam * 0.75 / (2 * B)  # d/dr of lam * mean^2 = 2 lam mean / (2B) = 0.0375
        assert_close(gc - BT_GRAD_C, torch.full((B,), shift))
        assert_close(gr - BT_GRAD_R, torch.full((B,), shift))

    def test_global_batch_without_process_group_is_per_device(self):
        assert not torch.distributed.is_initialized()
        per_device = value_and_grads(losses.bsr, RC, RR, lam=0.1)
        global_ = value_and_grads(losses.bsr, RC, RR, lam=0.1, global_batch=True)
        for a, b in zip(per_device, global_):
            assert_close(a, b)

    def test_global_batch_takes_mean_over_all_processes(self, monkeypatch):
        # Simulated world of 2: the other rank holds rewards [3, 5, -1, 1]. Global mean of
        # [1, 0, 0, 2, 3, 5, -1, 1] = 11/8. (The real collective is tested with 2 processes elsewhere.)
        import torch.distributed.nn.functional as dist_fn

        other = T(3.0, 5.0, -1.0, 1.0)
        monkeypatch.setattr(losses, "_world_size", lambda: 2)
        monkeypatch.setattr(dist_fn, "all_gather", lambda r: (r, other))
        out = losses.bsr(T(*RC), T(*RR), lam=0.1, global_batch=True)
        assert_close(out, torch.tensor(BT_VALUE + 0.1 * (11 / 8) ** 2))
        # without global_batch the other rank is ignored
        assert_close(losses.bsr(T(*RC), T(*RR), lam=0.1), torch.tensor(BT_VALUE + 0.1 * 0.75**2))


class TestCenter:
    def test_value(self):
        # pair sums [1, 2]: coef * mean([1, 4]) = 0.1 * 2.5
        assert_close(losses.center(T(*RC), T(*RR), coef=0.1), torch.tensor(BT_VALUE + 0.25))
        assert_close(losses.center(T(*RC), T(*RR)), torch.tensor(BT_VALUE + 0.01 * 2.5))  # default coef

    def test_penalty_gradient_is_per_pair(self):
        coef = 0.1
        _, gc, gr = value_and_grads(losses.center, RC, RR, coef=coef)
        per_pair = T(*(2 * coef * s / B for s in (1.0, 2.0)))  # 2 coef (r_c + r_r) / B = [0.1, 0.2]
        assert_close(gc - BT_GRAD_C, per_pair)
        assert_close(gr - BT_GRAD_R, per_pair)


class TestMargin:
    def test_scalar_margin(self):
        v, gc, gr = value_and_grads(losses.margin, RC, RR, margin=0.5)
        assert_close(v, torch.tensor((-logsig(0.5) - logsig(-2.5)) / 2))
        assert_close(gc, T(-sig(-0.5) / B, -sig(2.5) / B))
        assert_close(gr, -gc)

    def test_per_pair_margin(self):
        m = T(1.0, 0.5)  # D - m = [0, -2.5]
        expected = (-logsig(0.0) - logsig(-2.5)) / 2
        assert_close(losses.margin(T(*RC), T(*RR), margin=m), torch.tensor(expected))

    def test_default_is_bt(self):
        assert_close(losses.margin(T(*RC), T(*RR)), torch.tensor(BT_VALUE))

    def test_wrong_margin_shape_raises(self):
        with pytest.raises(ValueError, match="margin"):
            losses.margin(T(*RC), T(*RR), margin=T(1.0, 2.0, 3.0))


class TestLabelSmoothing:
    def test_value_and_grad(self):
        eps = 0.1
        v, gc, gr = value_and_grads(losses.label_smoothing, RC, RR, eps=eps)
        expected = sum(-(1 - eps) * logsig(d) - eps * logsig(-d) for d in D) / B
        assert_close(v, torch.tensor(expected))
        # d/dD [-(1-eps) log sig(D) - eps log sig(-D)] = -(1-eps) sig(-D) + eps sig(D)
        assert_close(gc, T(*((-(1 - eps) * sig(-d) + eps * sig(d)) / B for d in D)))
        assert_close(gr, -gc)

    def test_eps_zero_is_bt(self):
        assert_close(losses.label_smoothing(T(*RC), T(*RR), eps=0.0), torch.tensor(BT_VALUE))


class TestHinge:
    def test_value_and_grad_both_active(self):
        # m = 1.5: relu([0.5, 3.5]) -> mean 2.0; every pair active: dL/dr_c = -1/B
        v, gc, gr = value_and_grads(losses.hinge, RC, RR, margin=1.5)
        assert_close(v, torch.tensor(2.0))
        assert_close(gc, T(-0.5, -0.5))
        assert_close(gr, T(0.5, 0.5))

    def test_inactive_pair_has_no_gradient(self):
        # m = 0.5: relu([-0.5, 2.5]) -> mean 1.25; the first pair is past the margin
        v, gc, gr = value_and_grads(losses.hinge, RC, RR, margin=0.5)
        assert_close(v, torch.tensor(1.25))
        assert_close(gc, T(0.0, -0.5))
        assert_close(gr, T(0.0, 0.5))

    def test_default_margin_is_one(self):
        # relu([0, 3]) -> 1.5
        assert_close(losses.hinge(T(*RC), T(*RR)), torch.tensor(1.5))


class TestLogitNorm:
    def test_value_and_grad(self):
        # norms [1, 2], D / norm = [1, -1]
        v, gc, gr = value_and_grads(losses.logitnorm, RC, RR)
        assert_close(v, torch.tensor((-logsig(1.0) - logsig(-1.0)) / 2))
        # z = D / n: dz/dr_c = 1/n - D r_c / n^3, dz/dr_r = -1/n - D r_r / n^3; dL/dz = -sig(-z) / B
        #   pair 1 (1, 0): dz/dr_c = 1 - 1 = 0,       dz/dr_r = -1
        #   pair 2 (0, 2): dz/dr_c = 1/2,             dz/dr_r = -1/2 + 4/8 = 0
        assert_close(gc, T(0.0, -sig(1.0) / B * 0.5))
        assert_close(gr, T(-sig(-1.0) / B * -1.0, 0.0))

    def test_general_gradient(self):
        rc, rr = (2.0, -1.0), (1.0, 0.5)
        _, gc, gr = value_and_grads(losses.logitnorm, rc, rr)
        exp_c, exp_r = [], []
        for a, b in zip(rc, rr):
            n = math.sqrt(a * a + b * b)
            z = (a - b) / n
            dl_dz = -sig(-z) / 2
            exp_c.append(dl_dz * (1 / n - (a - b) * a / n**3))
            exp_r.append(dl_dz * (-1 / n - (a - b) * b / n**3))
        assert_close(gc, T(*exp_c))
        assert_close(gr, T(*exp_r))

    def test_scale_invariant_and_finite_at_zero(self):
        assert_close(losses.logitnorm(T(3.0, 0.0), T(0.0, 6.0)), losses.logitnorm(T(*RC), T(*RR)))
        v, gc, gr = value_and_grads(losses.logitnorm, (0.0,), (0.0,))
        assert_close(v, torch.tensor(math.log(2)))
        assert torch.isfinite(gc).all() and torch.isfinite(gr).all()


class TestDR:
    def test_value_and_grad(self):
        v, gc, gr = value_and_grads(losses.dr, RC, RR)
        direct = ((-logsig(1.0) - logsig(-0.0)) + (-logsig(0.0) - logsig(-2.0))) / 2
        assert_close(v, torch.tensor(BT_VALUE + direct))
        # d/dr_c of -log sig(r_c) = -sig(-r_c); d/dr_r of -log sig(-r_r) = sig(r_r)
        assert_close(gc, BT_GRAD_C + T(*(-sig(-c) / B for c in RC)))
        assert_close(gr, BT_GRAD_R + T(*(sig(r) / B for r in RR)))


LC, LR = (-10.0, -2.0), (-12.0, -1.0)  # summed response log-probs under the policy
REF_C, REF_R = (-11.0, -3.0), (-11.0, -2.0)  # ... under the frozen reference


class TestRegularizers:
    def test_none_is_zero_tensor(self):
        out = REGULARIZERS["none"](T(*LC), T(*LR))
        assert isinstance(out, torch.Tensor) and out.ndim == 0
        assert_close(out, torch.tensor(0.0))

    def test_sft(self):
        beta = 0.1
        v, gc = value_and_grads(lambda c: REGULARIZERS["sft"](c, None, beta=beta), LC)
        assert_close(v, torch.tensor((-logsig(-1.0) - logsig(-0.2)) / 2))
        assert_close(gc, T(*(-beta * sig(-beta * x) / B for x in LC)))

    def test_sft_default_beta(self):
        assert_close(REGULARIZERS["sft"](T(*LC), T(*LR)), torch.tensor((-logsig(-1.0) - logsig(-0.2)) / 2))

    def test_sft_nll(self):
        v, gc = value_and_grads(lambda c: REGULARIZERS["sft_nll"](c, None), LC)
        assert_close(v, torch.tensor(6.0))
        assert_close(gc, T(-0.5, -0.5))

    def test_dpo_noref(self):
        beta = 0.1
        v, gc, gr = value_and_grads(lambda c, r: REGULARIZERS["dpo_noref"](c, r, beta=beta), LC, LR)
        u = (0.2, -0.1)  # beta * (logp_c - logp_r)
        assert_close(v, torch.tensor((-logsig(0.2) - logsig(-0.1)) / 2))
        assert_close(gc, T(*(-beta * sig(-x) / B for x in u)))
        assert_close(gr, -gc)

    def test_dpo(self):
        beta = 0.1
        ref = dict(ref_logp_c=T(*REF_C), ref_logp_r=T(*REF_R))
        v, gc, gr = value_and_grads(lambda c, r: REGULARIZERS["dpo"](c, r, beta=beta, **ref), LC, LR)
        u = (0.2, 0.0)  # beta * ((logp_c - ref_c) - (logp_r - ref_r)) = 0.1 * [1 + 1, 1 - 1]
        assert_close(v, torch.tensor((-logsig(0.2) - logsig(0.0)) / 2))
        assert_close(gc, T(*(-beta * sig(-x) / B for x in u)))
        assert_close(gr, -gc)

    def test_dpo_without_refs_raises(self):
        with pytest.raises(ValueError, match="ref_logp_c, ref_logp_r.*dpo_noref"):
            REGULARIZERS["dpo"](T(*LC), T(*LR))
        with pytest.raises(ValueError, match="ref_logp_r"):
            REGULARIZERS["dpo"](T(*LC), T(*LR), ref_logp_c=T(*REF_C))

    def test_dpo_noref_without_rejected_raises(self):
        with pytest.raises(ValueError, match="logp_r"):
            REGULARIZERS["dpo_noref"](T(*LC), None)

    def test_requirement_sets(self):
        assert NEEDS_REFERENCE == {"dpo"}
        assert NEEDS_REJECTED_LOGP == {"dpo_noref", "dpo"}
        assert NEEDS_LOGP == {"sft", "sft_nll", "dpo_noref", "dpo"}


class TestRegistry:
    def test_reward_params_match_signatures(self):
        assert set(REWARD_LOSS_PARAMS) == set(REWARD_LOSSES)
        for name, fn in REWARD_LOSSES.items():
            params = list(inspect.signature(fn).parameters.values())[2:]
            assert {p.name: p.default for p in params} == REWARD_LOSS_PARAMS[name], name


class TestLossSpec:
    def test_defaults(self):
        spec = LossSpec()
        got = (spec.reward, spec.reward_params, spec.regularizer, spec.alpha, spec.beta)
        assert got == ("bt", {}, "none", 0.01, 0.1)

    def test_edges_allowed_and_params_normalized(self):
        LossSpec(alpha=0.0)
        LossSpec(alpha=1.0)
        LossSpec(reward="label_smoothing", reward_params={"eps": 0})
        given = {"lam": 1}
        spec = LossSpec(reward="bsr", reward_params=given)
        assert spec.reward_params == {"lam": 1.0} and isinstance(spec.reward_params["lam"], float)
        assert spec.reward_params is not given
        assert spec.reward_kwargs == {"lam": 1.0, "global_batch": False}

    @pytest.mark.parametrize(
        "kwargs, names",
        [
            (dict(reward="bsrr"), ["reward", "'bsrr'", "'bsr'", "'logitnorm'"]),
            (dict(regularizer="sftt"), ["regularizer", "'sftt'", "'sft'", "'dpo_noref'"]),
            (dict(reward="bsr", reward_params={"lambda": 1e-3}), ["'lambda'", "'lam'", "'global_batch'"]),
            (dict(reward="bt", reward_params={"lam": 1e-3}), ["'lam'", "'bt'", "allowed keys: none"]),
            (dict(reward="hinge", reward_params={"eps": 0.1}), ["'eps'", "'margin'"]),
            (dict(reward="bsr", reward_params={"lam": -1e-3}), ["'lam'", ">= 0"]),
            (dict(reward="bsr", reward_params={"lam": float("nan")}), ["'lam'", ">= 0"]),
            (dict(reward="bsr", reward_params={"lam": True}), ["'lam'", ">= 0"]),
            (dict(reward="bsr", reward_params={"global_batch": "yes"}), ["'global_batch'", "True or False"]),
            (dict(reward="center", reward_params={"coef": -0.01}), ["'coef'", ">= 0"]),
            (dict(reward="label_smoothing", reward_params={"eps": 1.0}), ["'eps'", "[0, 1)"]),
            (dict(reward="label_smoothing", reward_params={"eps": -0.1}), ["'eps'", "[0, 1)"]),
            (dict(reward="margin", reward_params={"margin": torch.ones(2)}), ["'margin'", "compute_loss(margin="]),
            (dict(reward="hinge", reward_params={"margin": "1"}), ["'margin'", "finite number"]),
            (dict(reward_params=[("lam", 1)]), ["reward_params", "dict"]),
            (dict(alpha=1.5), ["alpha", "[0, 1]"]),
            (dict(alpha=-0.01), ["alpha", "[0, 1]"]),
            (dict(beta=0.0), ["beta", "> 0"]),
            (dict(beta=-0.1), ["beta", "> 0"]),
        ],
    )
    def test_bad_parameter_raises_naming_it_and_allowed_values(self, kwargs, names):
        with pytest.raises(ValueError) as err:
            LossSpec(**kwargs)
        for name in names:
            assert name in str(err.value), (name, str(err.value))


class TestComputeLoss:
    @pytest.mark.parametrize("name", sorted(REWARD_LOSSES))
    def test_reward_only_equals_registry_function(self, name):
        params = {"bsr": {"lam": 0.1}, "center": {"coef": 0.1}, "margin": {"margin": 0.5}}.get(name, {})
        total, m = compute_loss(LossSpec(reward=name, reward_params=params, alpha=0.5), T(*RC), T(*RR))
        assert_close(total, REWARD_LOSSES[name](T(*RC), T(*RR), **params))
        assert m["loss/total"] == m["loss/reward"] == pytest.approx(total.item())
        assert m["loss/bt"] == pytest.approx(BT_VALUE)
        assert m["loss/reg"] == 0.0
        if name not in ("bsr", "center", "dr"):
            assert m["loss/penalty"] == 0.0
        else:
            assert m["loss/reward"] == pytest.approx(m["loss/bt"] + m["loss/penalty"])

    def test_penalties_logged(self):
        _, m = compute_loss(LossSpec(reward="bsr", reward_params={"lam": 0.1}), T(*RC), T(*RR))
        assert m["loss/penalty"] == pytest.approx(0.1 * 0.75**2)
        _, m = compute_loss(LossSpec(reward="center", reward_params={"coef": 0.1}), T(*RC), T(*RR))
        assert m["loss/penalty"] == pytest.approx(0.25)

    def test_metrics(self):
        _, m = compute_loss(LossSpec(), T(*RC), T(*RR))
        assert tuple(m) == losses.METRIC_NAMES and all(type(v) is float for v in m.values())
        # rewards [1, 0, 0, 2]: mean 0.75, population variance (0.0625 + 0.5625 * 2 + 1.5625) / 4 = 0.6875
        expected = {
            "rewards/accuracy": 0.5, "rewards/margin": -0.5, "rewards/mean": 0.75,
            "rewards/std": math.sqrt(0.6875), "rewards/chosen_mean": 0.5, "rewards/rejected_mean": 1.0,
        }
        for k, v in expected.items():
            assert m[k] == pytest.approx(v), k

    def test_combination_weights(self):
        alpha = 0.25
        spec = LossSpec(regularizer="sft", alpha=alpha)
        v, gc, gr, glc = value_and_grads(lambda c, r, lc: compute_loss(spec, c, r, lc)[0], RC, RR, LC)
        sft = (-logsig(-1.0) - logsig(-0.2)) / 2
        assert_close(v, torch.tensor((1 - alpha) * BT_VALUE + alpha * sft))
        assert_close(gc, (1 - alpha) * BT_GRAD_C)
        assert_close(gr, (1 - alpha) * BT_GRAD_R)
        assert_close(glc, alpha * T(*(-0.1 * sig(-0.1 * x) / B for x in LC)))

    def test_alpha_ignored_without_regularizer(self):
        total, _ = compute_loss(LossSpec(alpha=0.5), T(*RC), T(*RR), T(*LC))
        assert_close(total, torch.tensor(BT_VALUE))

    def test_bsr_plus_grm(self):
        lam, alpha = 0.1, 0.1
        spec = LossSpec(reward="bsr", reward_params={"lam": lam}, regularizer="sft", alpha=alpha)
        v, gc, gr, glc = value_and_grads(lambda c, r, lc: compute_loss(spec, c, r, lc)[0], RC, RR, LC)
        sft = (-logsig(-1.0) - logsig(-0.2)) / 2
        assert_close(v, torch.tensor((1 - alpha) * (BT_VALUE + lam * 0.75**2) + alpha * sft))
        shift = 2 * lam * 0.75 / (2 * B)
        assert_close(gc, (1 - alpha) * (BT_GRAD_C + shift))
        assert_close(gr, (1 - alpha) * (BT_GRAD_R + shift))
        assert_close(glc, alpha * T(*(-0.1 * sig(-0.1 * x) / B for x in LC)))
        _, m = compute_loss(spec, T(*RC), T(*RR), T(*LC))
        assert m["loss/reg"] == pytest.approx(sft)
        assert m["loss/reward"] == pytest.approx(BT_VALUE + lam * 0.75**2)

    def test_dpo_reg_with_and_without_refs(self):
        spec = LossSpec(regularizer="dpo", alpha=0.5)
        with pytest.raises(ValueError, match="ref_logp_c"):
            compute_loss(spec, T(*RC), T(*RR), T(*LC), T(*LR))
        total, m = compute_loss(spec, T(*RC), T(*RR), T(*LC), T(*LR), T(*REF_C), T(*REF_R))
        dpo = (-logsig(0.2) - logsig(0.0)) / 2
        assert_close(total, torch.tensor(0.5 * BT_VALUE + 0.5 * dpo))

    def test_regularizer_without_logp_raises(self):
        with pytest.raises(ValueError, match="logp_c"):
            compute_loss(LossSpec(regularizer="sft"), T(*RC), T(*RR))

    def test_per_pair_margin(self):
        total, _ = compute_loss(LossSpec(reward="margin"), T(*RC), T(*RR), margin=T(1.0, 0.5))
        assert_close(total, torch.tensor((math.log(2) + math.log1p(math.exp(2.5))) / 2))
        with pytest.raises(ValueError, match="takes no margin"):
            compute_loss(LossSpec(reward="bsr"), T(*RC), T(*RR), margin=T(1.0, 0.5))

    def test_bf16_inputs_give_float32_loss(self):
        spec = LossSpec(reward="bsr", regularizer="sft")
        total, _ = compute_loss(spec, T(*RC).bfloat16(), T(*RR).bfloat16(), T(*LC).bfloat16())
        assert total.dtype == torch.float32


class TestAssertFiniteLoss:
    def test_finite_passes(self):
        _, m = compute_loss(LossSpec(), T(*RC), T(*RR))
        assert_finite_loss(m, step=3)
        assert_finite_loss({"loss/total": torch.tensor(1.0)}, step=3)

    def test_names_step_and_bad_parts(self):
        parts = {"loss/bt": torch.tensor(0.5), "loss/reg": torch.tensor(float("nan")), "loss/total": float("inf")}
        with pytest.raises(FloatingPointError) as err:
            assert_finite_loss(parts, step=7)
        msg = str(err.value)
        assert "step 7" in msg and "loss/reg=nan" in msg and "loss/total=inf" in msg
        assert "loss/bt" not in msg
