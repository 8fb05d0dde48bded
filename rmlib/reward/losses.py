"""Loss registry: reward losses and GRM text-generation regularizers, as pure functions.

Rewards (and log-probs) in, scalar loss out; no model code. Notation, for one micro-batch of
B preference pairs (x_i, y_c, y_r):

    r_c, r_r        (B,)  reward-head outputs for the chosen / rejected response
    D = r_c - r_r   (B,)  reward margin
    logp_c, logp_r  (B,)  SUM of response-token log-probs under the kept LM head (prompt masked)

Every loss casts its inputs with ``.float()`` and computes in float32 (bf16 rewards lose the
small differences that the penalties act on). Registries:

    REWARD_LOSSES[name](r_c, r_r, **params) -> scalar      params and defaults: REWARD_LOSS_PARAMS
    REGULARIZERS[name](logp_c, logp_r, *, beta, ref_logp_c, ref_logp_r) -> scalar

``LossSpec`` names one of each (BSR+GRM is ``LossSpec(reward="bsr", regularizer="sft")``) and
validates the parameters once; the functions themselves trust what they are given.
``compute_loss`` combines them as in GRM, L = (1 - alpha) L_reward + alpha L_reg, and returns
prefixed metrics. Papers: BSR = Hong et al., ICML 2025 (code LinkedIn-XFACT/RM-Robustness);
GRM = Yang et al., NeurIPS 2024 (code YangRui2015/Generalizable-Reward-Model).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bt", "bsr", "center", "margin", "label_smoothing", "hinge", "logitnorm", "dr",
    "REWARD_LOSSES", "REWARD_LOSS_PARAMS",
    "reg_none", "reg_sft", "reg_sft_nll", "reg_dpo_noref", "reg_dpo",
    "REGULARIZERS", "NEEDS_LOGP", "NEEDS_REJECTED_LOGP", "NEEDS_REFERENCE",
    "LossSpec", "compute_loss", "assert_finite_loss", "METRIC_NAMES",
]


# Added under the square root of logitnorm so that r_c = r_r = 0 gives 0 / 1e-6 = 0, not 0 / 0.
LOGITNORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# helpers
def _pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("r_c", "r_r")) -> tuple[Tensor, Tensor]:
    """Check two (B,) tensors of one batch and return them as float32.

    A (B, 1) reward-head output next to a (B,) one would silently broadcast to (B, B).
    """
    if a.ndim != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"{names[0]} and {names[1]} must both have shape (B,) with B >= 1, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.float(), b.float()


def _per_pair(value: float | Tensor, like: Tensor, name: str) -> float | Tensor:
    """A scalar or (B,) per-pair parameter (e.g. margin), as float32 on ``like``'s device."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.ndim > 1 or (value.ndim == 1 and value.shape != like.shape):
        raise ValueError(f"{name} must be a number or a tensor of shape {tuple(like.shape)}, got {tuple(value.shape)}")
    return value.to(device=like.device, dtype=torch.float32)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _batch_rewards(r_c: Tensor, r_r: Tensor, global_batch: bool) -> Tensor:
    """All rewards the BSR mean is taken over: this device's 2B, or every process's 2B * W."""
    r = torch.cat([r_c, r_r])  # (2B,)
    if global_batch and _world_size() > 1:
        import torch.distributed.nn.functional as dist_fn  # autograd-aware collectives

        # Backward sums every rank's gradient into the local slice (reduce-scatter). Each rank
        # computes the same penalty and DDP averages over the W ranks, so the update is exactly
        # the gradient of lam * (global mean)^2. All ranks must have the same B. (torch 2.13 marks
        # this function deprecated, FutureWarning once per process, and it does not torch.compile.)
        r = torch.cat(dist_fn.all_gather(r))  # (2B * W,)
    return r


# ----------------------------------------------------------------------------------------------
# reward losses: fn(r_c (B,), r_r (B,), **params) -> scalar, float32
# The additive penalties of bsr / center / dr are separate so compute_loss can log them.
def bt(r_c: Tensor, r_r: Tensor) -> Tensor:
    """Bradley-Terry: mean_i -log sigmoid(r_c - r_r).

    L_BT of both papers; TRL RewardTrainer; BSR code reward_trainer.py (default branch).
    """
    r_c, r_r = _pair(r_c, r_r)
    return -F.logsigmoid(r_c - r_r).mean()


def _bsr_penalty(r_c: Tensor, r_r: Tensor, lam: float = 1e-3, global_batch: bool = False) -> Tensor:
    r_c, r_r = _pair(r_c, r_r)
    return lam * _batch_rewards(r_c, r_r, global_batch).mean().square()


def bsr(r_c: Tensor, r_r: Tensor, lam: float = 1e-3, global_batch: bool = False) -> Tensor:
    """BSR, batch-wise sum-to-zero regularization (Hong et al., ICML 2025):

        L = L_BT + lam * ( (1/2B) sum_i (r_c,i + r_r,i) )^2      (squared mean of all 2B rewards)

    d(penalty)/dr = 2 lam mean / (2B), the same for every reward in the batch: the whole batch
    is shifted towards mean 0, pairs are not centred individually (contrast ``center``).

    ``lam`` vs the official code (LinkedIn-XFACT/RM-Robustness, modules/trainers/reward_trainer.py,
    commit 3bafaab): ``RewardTrainer.__init__`` sets ``args.bsr_lambda = args.bsr_lambda *
    self._train_batch_size`` (HF Trainer: per_device_train_batch_size * max(1, n_gpu), i.e. the
    per-device micro-batch B under DDP; gradient accumulation not included), and ``compute_loss``
    adds ``bsr_lambda * torch.mean(torch.cat([rewards_chosen, rewards_rejected], dim=0)).square()``,
    the squared mean of that device's 2B rewards, not gathered. Hence

        official(lambda_o) == ours(lam = lambda_o * B).

    Our ``lam`` is the paper's formula read literally. Example: recipes/skywork-bsr/rm.yaml uses
    bsr_lambda 1e-3 with per_device_train_batch_size 16, which is lam = 0.016 here.

    global_batch: if True and torch.distributed is initialized with world size W > 1, the mean is
    over all W processes' rewards (``torch.distributed.nn.functional.all_gather``; gradients reach
    the local part). Otherwise, and always in the official code, it is per device.
    """
    return bt(r_c, r_r) + _bsr_penalty(r_c, r_r, lam=lam, global_batch=global_batch)


def _center_penalty(r_c: Tensor, r_r: Tensor, coef: float = 0.01) -> Tensor:
    r_c, r_r = _pair(r_c, r_r)
    return coef * (r_c + r_r).square().mean()


def center(r_c: Tensor, r_r: Tensor, coef: float = 0.01) -> Tensor:
    """Per-pair reward centering (Eisenstein et al., "Helping or Herding", Eq. 2):

        L = L_BT + coef * mean_i (r_c,i + r_r,i)^2

    TRL's ``center_rewards_coefficient`` (recommended 0.01). d(penalty)/dr_c,i = d/dr_r,i =
    2 coef (r_c,i + r_r,i) / B: each pair is pulled to sum 0 on its own. (The BSR code's version of
    this branch crashes: ``.pow()`` without an exponent.)
    """
    return bt(r_c, r_r) + _center_penalty(r_c, r_r, coef=coef)


def margin(r_c: Tensor, r_r: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """BT with margin: mean_i -log sigmoid(r_c,i - r_r,i - m_i).

    m is a number or a (B,) per-pair tensor (GRM baseline: m = |rating_c - rating_r|; Llama-2
    RM). BSR code: ``use_margin`` with scalar ``args.margin`` (default 0.0, i.e. plain BT).
    ``RMTrainer`` passes the per-pair m from the pairs' scores unless ``loss_params`` sets a
    constant (``rmlib.reward.trainer.per_pair_margins``).
    """
    r_c, r_r = _pair(r_c, r_r)
    return -F.logsigmoid(r_c - r_r - _per_pair(margin, r_c, "margin")).mean()


def label_smoothing(r_c: Tensor, r_r: Tensor, eps: float = 0.1) -> Tensor:
    """Label-smoothed BT (GRM baseline, eps = 0.1):

        mean_i [ -(1 - eps) log sigmoid(D_i) - eps log sigmoid(-D_i) ]

    Minimized at D = log((1 - eps) / eps), so the margin stays bounded.
    """
    r_c, r_r = _pair(r_c, r_r)
    d = r_c - r_r
    return (-(1.0 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)).mean()


def hinge(r_c: Tensor, r_r: Tensor, margin: float | Tensor = 1.0) -> Tensor:
    """Hinge: mean_i relu(m_i - D_i). m: number or (B,) tensor.

    BSR code: ``use_hinge``, ``torch.relu(args.margin - (rewards_chosen - rewards_rejected))``
    (its ``args.margin`` defaults to 0.0, shared with ``use_margin``; ours defaults to 1.0).
    """
    r_c, r_r = _pair(r_c, r_r)
    return F.relu(_per_pair(margin, r_c, "margin") - (r_c - r_r)).mean()


def logitnorm(r_c: Tensor, r_r: Tensor) -> Tensor:
    """BT-Norm / LogitNorm: mean_i -log sigmoid( D_i / sqrt(r_c,i^2 + r_r,i^2 + 1e-12) ).

    BSR code (reward_trainer.py, ``use_normalization``): ``reward_vector_norm =
    torch.sqrt(rewards_chosen ** 2 + rewards_rejected ** 2)``, loss ``-logsigmoid((rewards_chosen -
    rewards_rejected) / reward_vector_norm).mean()``, with no epsilon (0/0 = NaN when both rewards
    are 0); we add LOGITNORM_EPS under the root. |D| / ||(r_c, r_r)|| <= sqrt(2), so the loss is
    scale-invariant and never below -log sigmoid(sqrt 2) ~ 0.216.
    """
    r_c, r_r = _pair(r_c, r_r)
    norm = torch.sqrt(r_c.square() + r_r.square() + LOGITNORM_EPS)
    return -F.logsigmoid((r_c - r_r) / norm).mean()


def _dr_penalty(r_c: Tensor, r_r: Tensor) -> Tensor:
    r_c, r_r = _pair(r_c, r_r)
    return (-F.logsigmoid(r_c) - F.logsigmoid(-r_r)).mean()


def dr(r_c: Tensor, r_r: Tensor) -> Tensor:
    """BT-DR, BT plus the direct-reward term of Eurus (Yuan et al. 2024):

        L = mean_i [ -log sigmoid(D_i) - log sigmoid(r_c,i) - log sigmoid(-r_r,i) ]

    The DR term pushes chosen rewards above 0 and rejected below 0 in absolute terms. BSR code
    (``use_eurus``) adds ``-torch.log(sigmoid(rewards_chosen)) - torch.log(sigmoid(-rewards_rejected))``
    to the unreduced BT loss, then takes the mean; we use logsigmoid (the log of a sigmoid
    underflows to -inf for rewards below about -88).
    """
    return bt(r_c, r_r) + _dr_penalty(r_c, r_r)


REWARD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "bt": bt,
    "bsr": bsr,
    "center": center,
    "margin": margin,
    "label_smoothing": label_smoothing,
    "hinge": hinge,
    "logitnorm": logitnorm,
    "dr": dr,
}


# Parameters of each reward loss and their defaults (the same as the function signatures).
REWARD_LOSS_PARAMS: dict[str, dict[str, Any]] = {
    "bt": {},
    "bsr": {"lam": 1e-3, "global_batch": False},
    "center": {"coef": 0.01},
    "margin": {"margin": 0.0},
    "label_smoothing": {"eps": 0.1},
    "hinge": {"margin": 1.0},
    "logitnorm": {},
    "dr": {},
}


# Losses of the form L_BT + penalty; compute_loss logs the penalty as loss/penalty.
_PENALTIES: dict[str, Callable[..., Tensor]] = {"bsr": _bsr_penalty, "center": _center_penalty, "dr": _dr_penalty}


# ----------------------------------------------------------------------------------------------
# GRM regularizers on summed response log-probs:
#   fn(logp_c (B,), logp_r (B,) | None, *, beta, ref_logp_c, ref_logp_r) -> scalar, float32
def reg_none(logp_c: Tensor | None = None, logp_r: Tensor | None = None, *, beta: float = 0.1,
             ref_logp_c: Tensor | None = None, ref_logp_r: Tensor | None = None) -> Tensor:
    """No regularizer: 0 (a float32 scalar tensor, on logp_c's device when given)."""
    return torch.zeros((), device=logp_c.device if logp_c is not None else None)


def _one(logp: Tensor | None, name: str) -> Tensor:
    if logp is None or logp.ndim != 1 or logp.numel() == 0:
        got = None if logp is None else tuple(logp.shape)
        raise ValueError(f"{name} must be a tensor of shape (B,) with B >= 1, got {got}")
    return logp.float()


def reg_sft(logp_c: Tensor, logp_r: Tensor | None = None, *, beta: float = 0.1,
            ref_logp_c: Tensor | None = None, ref_logp_r: Tensor | None = None) -> Tensor:
    """GRM SFT regularizer (default): mean_i -log sigmoid(beta * log pi(y_c,i | x_i)). Chosen only.

    log pi is <= 0, so this is ~ -beta log pi for long responses and flattens as log pi -> 0.
    """
    return -F.logsigmoid(beta * _one(logp_c, "logp_c")).mean()


def reg_sft_nll(logp_c: Tensor, logp_r: Tensor | None = None, *, beta: float = 0.1,
                ref_logp_c: Tensor | None = None, ref_logp_r: Tensor | None = None) -> Tensor:
    """GRM plain-NLL variant of the SFT regularizer: mean_i -log pi(y_c,i | x_i). beta unused."""
    return -_one(logp_c, "logp_c").mean()


def reg_dpo_noref(logp_c: Tensor, logp_r: Tensor, *, beta: float = 0.1,
                  ref_logp_c: Tensor | None = None, ref_logp_r: Tensor | None = None) -> Tensor:
    """GRM DPO regularizer without reference: mean_i -log sigmoid(beta * (log pi(y_c|x) - log pi(y_r|x)))."""
    if logp_r is None:
        raise ValueError("regularizer 'dpo_noref' needs logp_r (log-probs of the rejected responses)")
    logp_c, logp_r = _pair(logp_c, logp_r, ("logp_c", "logp_r"))
    return -F.logsigmoid(beta * (logp_c - logp_r)).mean()


def reg_dpo(logp_c: Tensor, logp_r: Tensor, *, beta: float = 0.1,
            ref_logp_c: Tensor | None = None, ref_logp_r: Tensor | None = None) -> Tensor:
    """GRM DPO regularizer, log-ratios against a frozen copy of the base model:

        mean_i -log sigmoid(beta * ((logp_c - ref_logp_c) - (logp_r - ref_logp_r)))
    """
    if logp_r is None or ref_logp_c is None or ref_logp_r is None:
        given = {"logp_r": logp_r, "ref_logp_c": ref_logp_c, "ref_logp_r": ref_logp_r}
        missing = [n for n, v in given.items() if v is None]
        raise ValueError(
            f"regularizer 'dpo' needs {', '.join(missing)} (ref_* = log-probs under the frozen reference "
            "model); use 'dpo_noref' to regularize without a reference"
        )
    logp_c, logp_r = _pair(logp_c, logp_r, ("logp_c", "logp_r"))
    ref_c, ref_r = _pair(ref_logp_c, ref_logp_r, ("ref_logp_c", "ref_logp_r"))
    if ref_c.shape != logp_c.shape:
        raise ValueError(f"ref_logp_c has shape {tuple(ref_c.shape)}, logp_c {tuple(logp_c.shape)}")
    return -F.logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))).mean()


REGULARIZERS: dict[str, Callable[..., Tensor]] = {
    "none": reg_none,
    "sft": reg_sft,
    "sft_nll": reg_sft_nll,
    "dpo_noref": reg_dpo_noref,
    "dpo": reg_dpo,
}


NEEDS_LOGP = frozenset(REGULARIZERS) - {"none"}          # the LM head must produce logp_c


NEEDS_REJECTED_LOGP = frozenset({"dpo_noref", "dpo"})   # ... and logp_r


NEEDS_REFERENCE = frozenset({"dpo"})                    # ... and a frozen reference model


# ----------------------------------------------------------------------------------------------
# combination
def _number(where: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{where} = {value!r} is not allowed; allowed values: {allowed}")
    return float(value)


def _check_reward_param(key: str, value: Any) -> Any:
    where = f"LossSpec.reward_params[{key!r}]"
    if key == "global_batch":
        if not isinstance(value, bool):
            raise ValueError(f"{where} = {value!r} is not allowed; allowed values: True or False")
        return value
    if key in ("lam", "coef"):
        return _number(where, value, "a finite number >= 0", lambda v: v >= 0)
    if key == "eps":
        return _number(where, value, "a number in [0, 1)", lambda v: 0 <= v < 1)
    if key == "margin":
        return _number(where, value, "a finite number (per-pair margins: compute_loss(margin=tensor))", lambda v: True)
    raise AssertionError(f"no validation rule for reward parameter {key!r}")  # keep in sync with REWARD_LOSS_PARAMS


@dataclass
class LossSpec:
    """Which reward loss and GRM regularizer to train with. Validated on construction.

    total = (1 - alpha) * L_reward + alpha * L_reg   if regularizer != "none"   (GRM)
          = L_reward                                  otherwise (alpha ignored)
    """

    reward: str = "bt"
    """Key of REWARD_LOSSES ("bt", "bsr", "center", "margin", "label_smoothing", "hinge", "logitnorm", "dr")."""
    reward_params: dict = field(default_factory=dict)
    """Overrides of REWARD_LOSS_PARAMS[reward], e.g. {"lam": 1e-2}; plain values (per-pair margins: compute_loss)."""
    regularizer: str = "none"
    """Key of REGULARIZERS ("none", "sft", "sft_nll", "dpo_noref", "dpo"); "sft" is GRM's default."""
    alpha: float = 0.01
    """GRM weight of the regularizer, in [0, 1] (paper default 0.01, best in 0.005..0.05)."""
    beta: float = 0.1
    """GRM temperature on summed log-probs, > 0 (paper default 0.1)."""

    def __post_init__(self) -> None:
        if self.reward not in REWARD_LOSSES:
            raise ValueError(f"LossSpec.reward = {self.reward!r} is unknown; allowed values: {sorted(REWARD_LOSSES)}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(
                f"LossSpec.regularizer = {self.regularizer!r} is unknown; allowed values: {sorted(REGULARIZERS)}"
            )
        if not isinstance(self.reward_params, Mapping):
            raise ValueError(f"LossSpec.reward_params must be a dict, got {type(self.reward_params).__name__}")
        allowed = REWARD_LOSS_PARAMS[self.reward]
        params = {}
        for key, value in self.reward_params.items():
            if key not in allowed:
                raise ValueError(
                    f"LossSpec.reward_params has {key!r}, which reward loss {self.reward!r} does not take; "
                    f"allowed keys: {sorted(allowed) or 'none'}"
                )
            params[key] = _check_reward_param(key, value)
        self.reward_params = params
        self.alpha = _number("LossSpec.alpha", self.alpha, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self.beta = _number("LossSpec.beta", self.beta, "a finite number > 0", lambda v: v > 0)

    @property
    def reward_kwargs(self) -> dict[str, Any]:
        """All parameters of the reward loss: defaults from REWARD_LOSS_PARAMS, then reward_params."""
        return {**REWARD_LOSS_PARAMS[self.reward], **self.reward_params}


METRIC_NAMES = (
    "loss/total",             # what is backpropagated
    "loss/reward",            # the full reward loss, penalty included
    "loss/bt",                # plain BT of the same rewards (for margin/hinge/... a diagnostic)
    "loss/penalty",           # additive term of bsr / center / dr; 0 for the others
    "loss/reg",               # GRM regularizer; 0 if none
    "rewards/accuracy",       # mean(r_c > r_r); ties count as wrong
    "rewards/margin",         # mean(r_c - r_r)
    "rewards/mean",           # over all 2B rewards of this device
    "rewards/std",            # population std (correction 0) over the 2B rewards
    "rewards/chosen_mean",
    "rewards/rejected_mean",
)


def compute_loss(
    spec: LossSpec,
    r_c: Tensor,
    r_r: Tensor,
    logp_c: Tensor | None = None,
    logp_r: Tensor | None = None,
    ref_logp_c: Tensor | None = None,
    ref_logp_r: Tensor | None = None,
    *,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Loss of one micro-batch and its metrics (METRIC_NAMES, detached floats, this device only).

    total = (1 - alpha) L_reward + alpha L_reg if spec.regularizer != "none", else L_reward
    (GRM: L = (1 - alpha) L_BT + alpha L_reg). ``margin``: per-pair (B,) margins for a reward loss
    with a margin parameter ("margin", "hinge"); overrides spec.reward_params["margin"].
    """
    r_c32, r_r32 = _pair(r_c, r_r)
    kwargs = dict(spec.reward_params)
    if margin is not None:
        if "margin" not in REWARD_LOSS_PARAMS[spec.reward]:
            raise ValueError(
                f"compute_loss(margin=...) given, but reward loss {spec.reward!r} takes no margin; "
                f"losses with a margin: {sorted(k for k, p in REWARD_LOSS_PARAMS.items() if 'margin' in p)}"
            )
        kwargs["margin"] = margin
    zero = torch.zeros((), device=r_c32.device)

    if spec.reward == "bt":
        l_bt = l_reward = bt(r_c32, r_r32)
        penalty = zero
    elif spec.reward in _PENALTIES:
        l_bt = bt(r_c32, r_r32)
        penalty = _PENALTIES[spec.reward](r_c32, r_r32, **kwargs)
        l_reward = l_bt + penalty
    else:
        l_reward, penalty = REWARD_LOSSES[spec.reward](r_c32, r_r32, **kwargs), zero
        with torch.no_grad():
            l_bt = bt(r_c32, r_r32)  # diagnostic only

    if spec.regularizer == "none":
        l_reg, total = zero, l_reward
    else:
        if logp_c is None:
            raise ValueError(f"regularizer {spec.regularizer!r} needs logp_c (summed response log-probs)")
        l_reg = REGULARIZERS[spec.regularizer](
            logp_c, logp_r, beta=spec.beta, ref_logp_c=ref_logp_c, ref_logp_r=ref_logp_r
        )
        total = (1.0 - spec.alpha) * l_reward + spec.alpha * l_reg

    with torch.no_grad():
        r = torch.cat([r_c32, r_r32])  # (2B,)
        d = r_c32 - r_r32  # (B,)
        values = torch.stack([
            total, l_reward, l_bt, penalty, l_reg,
            (d > 0).float().mean(), d.mean(), r.mean(), r.std(correction=0), r_c32.mean(), r_r32.mean(),
        ]).tolist()  # one device sync for all metrics
    return total, dict(zip(METRIC_NAMES, values))


def assert_finite_loss(parts: Mapping[str, Tensor | float], step: int) -> None:
    """Raise FloatingPointError naming ``step`` and every part of ``parts`` that is NaN or inf.

    ``parts`` is e.g. the metrics of compute_loss, or {"loss/total": total, ...} as tensors.
    """
    bad = []
    for name, value in parts.items():
        if isinstance(value, Tensor):
            value = value.detach()
            if not bool(torch.isfinite(value).all()):
                bad.append(f"{name}={value.item() if value.numel() == 1 else 'tensor with NaN/inf'}")
        elif not math.isfinite(value):
            bad.append(f"{name}={value}")
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)}")
