"""Hidden-state dispersion diagnostics of a reward model (BSR paper, Hong et al. ICML 2025, §4).

For a linear head W_p the reward of a reply is

    r(x, y) = W_p . h(x, y) = ||W_p|| * ||h|| * cos(psi),

h = final-layer hidden state of the last token. The paper finds ||W_p|| stays ~1 under BT
training, so reward magnitude follows ||h||: under BT the distances ||h(x,y_c) - h(x,y_r)|| grow
in mean and variance and become right-skewed epoch by epoch (Fig 2), and the effective rank of
the hidden-state matrix shifts from train to eval sets (Table 1); BSR keeps both in check.

Pieces:
- ``extract_hidden``: rewards + hidden states of an encoded pair set (wraps ``score_pairs``);
- pure numpy statistics: ``norm_stats``, ``pair_distance_stats``, ``head_cosines``,
  ``reward_decomposition``, ``effective_rank``; ``check_decomposition`` checks the identity;
- ``dispersion_summary``: one flat row of all statistics for a (model, split, step);
- ``NormProbeCallback``: the same statistics on a fixed probe set during training, resumable, and
  on held-out / OOD sets at every epoch end; ``epoch_table``, ``overtraining_from_records`` and
  ``spreading_from_records`` turn its records into the per-epoch table and the regime verdicts
  (``rmlib.analysis.claims``);
- ``records_frame`` / ``distance_frame``: records -> DataFrames shaped for seaborn.

Statistic names are shared by summaries and callback records: ``w_norm``, ``h_norm_<s>``
(||h|| over chosen and rejected replies together), ``pair_dist_<s>`` (||h_c - h_r||),
``erank``, ``reward_mean``, ``reward_std``, ``accuracy``, ``loss`` (BT), ``loss_sem``; <s> in mean, std, cv, q05 ... q95
(+ ``skew`` for distances).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from rmlib.analysis import claims
from rmlib.core.runs import RecordsCallback, read_records, write_records  # noqa: F401 (read/write: this module's API)
from rmlib.model.scoring import score_pairs

logger = logging.getLogger(__name__)


QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


RECORDS_FILE = "norm_records.jsonl"


ID_COLUMNS = ("model", "split", "step", "epoch", "epoch_end")


LIST_FIELDS = ("pair_distances",)


# -- hidden states ------------------------------------------------------------------------------
@dataclass
class HiddenStates:
    """Last-token final hidden states and rewards of N pairs (float32 numpy)."""

    chosen: np.ndarray  # (N, H)
    rejected: np.ndarray  # (N, H)
    reward_chosen: np.ndarray  # (N,)
    reward_rejected: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def all(self) -> np.ndarray:
        """Chosen then rejected rows: (2N, H)."""
        return np.concatenate([self.chosen, self.rejected])

    @property
    def rewards(self) -> np.ndarray:
        """Chosen then rejected rewards: (2N,), row-aligned with ``all``."""
        return np.concatenate([self.reward_chosen, self.reward_rejected])


def extract_hidden(model, encoded_pairs, batch_size: int = 8, bf16: bool | str = "auto", progress: bool = True) -> HiddenStates:
    """Rewards and last-token hidden states of an encoded pair set (see ``rmlib.model.encoding.encode_pairs``).

    A thin wrapper over ``rmlib.model.scoring.score_pairs(..., return_hidden=True)``. With ``bf16`` the
    forward runs under bf16 autocast, so rewards equal head(hidden) only to bf16 precision.
    """
    out = score_pairs(model, encoded_pairs, batch_size=batch_size, bf16=bf16, progress=progress,
                      return_hidden=True, desc="hidden states")
    return HiddenStates(chosen=out["hidden_chosen"], rejected=out["hidden_rejected"],
                        reward_chosen=out["chosen"], reward_rejected=out["rejected"])


# -- statistics (pure numpy) --------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("statistics of an empty set")
    mean, std = float(v.mean()), float(v.std())
    stats = {"mean": mean, "std": std, "cv": std / mean if mean != 0 else math.nan}
    for q, value in zip(QUANTILES, np.quantile(v, QUANTILES)):
        stats[f"q{round(q * 100):02d}"] = float(value)
    return stats


def _rows(h, name: str) -> np.ndarray:
    h = _as_numpy(h)
    if h.ndim != 2:
        raise ValueError(f"{name} must be (N, H); got shape {h.shape}")
    return h


def norm_stats(h) -> dict[str, float]:
    """Statistics of the row norms ||h_i|| of h (N, H).

    mean, std (population, ddof=0), cv = std / mean (coefficient of variation; nan if mean is 0),
    and the quantiles q05, q25, q50, q75, q95 (numpy linear interpolation).
    BSR paper §4 / Fig 3: the spread of ||h|| drives the spread of rewards.
    """
    h = _rows(h, "h")
    return _summary(np.linalg.norm(h.astype(np.float64), axis=1))


def skewness(values) -> float:
    """Fisher-Pearson skewness g1 = m3 / m2^(3/2), m_k = mean((x - mean)^k) (``scipy.stats.skew``, biased).

    nan when all values are equal (or empty).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or v.min() == v.max():
        return math.nan  # scipy returns nan too, after a precision-loss warning
    return float(scipy.stats.skew(v))


def pair_distances(h_chosen, h_rejected) -> np.ndarray:
    """||h(x, y_c) - h(x, y_r)|| per pair: (N,) float64."""
    h_c, h_r = _rows(h_chosen, "h_chosen"), _rows(h_rejected, "h_rejected")
    if h_c.shape != h_r.shape:
        raise ValueError(f"h_chosen {h_c.shape} and h_rejected {h_r.shape} differ in shape")
    return np.linalg.norm(h_c.astype(np.float64) - h_r.astype(np.float64), axis=1)


def pair_distance_stats(h_chosen, h_rejected) -> dict[str, float]:
    """Statistics of d_i = ||h(x_i, y_c) - h(x_i, y_r)|| (BSR paper Fig 2): the ``norm_stats``
    set (mean, std, cv, q05..q95) plus ``skew`` (Fisher-Pearson, see ``skewness``)."""
    d = pair_distances(h_chosen, h_rejected)
    return {**_summary(d), "skew": skewness(d)}


def head_cosines(w_p, h) -> np.ndarray:
    """cos(psi_i) = <W_p, h_i> / (||W_p|| ||h_i||) for W_p (H,) and h (N, H): (N,) float64 in [-1, 1].

    BSR paper §4. A zero h_i (or zero W_p) has no angle; its cosine is reported as 0.
    """
    w = _as_numpy(w_p).astype(np.float64).reshape(-1)
    h = _rows(h, "h").astype(np.float64)
    if h.shape[1] != w.shape[0]:
        raise ValueError(f"W_p has {w.shape[0]} entries but h has {h.shape[1]} columns")
    denom = np.linalg.norm(w) * np.linalg.norm(h, axis=1)
    dots = h @ w
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
    return np.clip(cos, -1.0, 1.0)


def reward_decomposition(w_p, h, rewards=None) -> pd.DataFrame:
    """r = ||W_p|| * ||h|| * cos(psi) per row of h (BSR paper §4), as a DataFrame.

    Columns: w_norm, h_norm, cos_psi, reconstructed (= w_norm * h_norm * cos_psi); with
    ``rewards`` (N,) also reward and abs_error = |reward - reconstructed|.
    """
    w = _as_numpy(w_p).astype(np.float64).reshape(-1)
    h = _rows(h, "h").astype(np.float64)
    cos = head_cosines(w, h)
    frame = pd.DataFrame({"w_norm": np.full(len(h), np.linalg.norm(w)), "h_norm": np.linalg.norm(h, axis=1),
                          "cos_psi": cos})
    frame["reconstructed"] = frame["w_norm"] * frame["h_norm"] * frame["cos_psi"]
    if rewards is not None:
        r = _as_numpy(rewards).astype(np.float64).reshape(-1)
        if len(r) != len(h):
            raise ValueError(f"{len(r)} rewards for {len(h)} hidden states")
        frame["reward"] = r
        frame["abs_error"] = (frame["reward"] - frame["reconstructed"]).abs()
    return frame


def linear_head_weight(model) -> np.ndarray:
    """W_p (H,) of a reward model with a linear head; ValueError for any other head."""
    head = getattr(model, "head", None)
    if not (isinstance(head, nn.Linear) and head.out_features == 1 and head.bias is None):
        kind = getattr(model, "head_kind", type(head).__name__)
        raise ValueError(
            f"r = ||W_p|| ||h|| cos(psi) holds only for a linear reward head (bias-free Linear(H, 1)); "
            f"this model's head is {kind!r}"
        )
    return head.weight.detach().float().cpu().numpy()[0]


def check_decomposition(model, hidden, rewards, atol: float = 1e-4, rtol: float = 1e-4) -> pd.DataFrame:
    """Check r = ||W_p|| * ||h|| * cos(psi) for every row; return the ``reward_decomposition`` frame.

    Raises ValueError for a non-linear (e.g. MLP) head, AssertionError when some
    |r - reconstructed| > atol + rtol * |r|. Rewards scored under bf16 autocast match only to
    bf16 precision: pass rtol ~ 2e-2 for them.
    """
    frame = reward_decomposition(linear_head_weight(model), hidden, rewards)
    bad = frame["abs_error"] > atol + rtol * frame["reward"].abs()
    if bad.any():
        worst = int(frame["abs_error"].idxmax())
        raise AssertionError(
            f"r = ||W_p|| ||h|| cos(psi) fails for {int(bad.sum())}/{len(frame)} rows (atol={atol}, rtol={rtol}); "
            f"worst row {worst}: reward {frame['reward'][worst]:.6g} vs reconstructed "
            f"{frame['reconstructed'][worst]:.6g}"
        )
    return frame


def effective_rank(h, center: bool = False) -> float:
    """Effective rank (Roy & Vetterli 2007) of the N x D matrix h: exp(-sum_i p_i ln p_i),
    p_i = s_i / sum_j s_j over its singular values s_i (0 ln 0 = 0).

    Rows are NOT centered by default: the BSR paper's Table 1 uses the raw hidden-state matrix.
    ``center=True`` subtracts the column means first (the rank of the covariance structure).
    Singular values below max(N, D) * eps * s_max (numpy's ``matrix_rank`` tolerance) count as 0,
    so a rank-k matrix with equal singular values gives k up to rounding. Lies in [1, min(N, D)].
    """
    x = _rows(h, "h").astype(np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    if s.size == 0 or s[0] == 0:
        raise ValueError("effective rank of a zero (or empty) matrix is undefined")
    s = s[s > s[0] * max(x.shape) * np.finfo(np.float64).eps]
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# -- one row of everything ----------------------------------------------------------------------
def dispersion_statistics(hidden: HiddenStates, model=None, erank_rows: int | None = None) -> dict:
    """All statistics of one hidden-state set, flat (see the module docstring for the names).

    ``w_norm`` = ||W_p|| (MLP head: its last layer, via ``head_weight_norm``); nan without a model.
    ``h_norm_*`` and ``erank`` use the 2N x H matrix of chosen and rejected replies together.
    ``loss`` / ``loss_sem``: mean Bradley-Terry loss -log sigmoid(r_c - r_r) over the pairs and its
    standard error (sd / sqrt(N)): over-training shows as a held-out loss that rises (Zhu et al.).
    ``erank_rows``: compute the effective rank on that many rows (a fixed random subset, seed 0),
    so sets of different sizes compare (the effective rank grows with the number of rows: a
    128-row and a 400-row sample of the same distribution differ); ValueError if the set is smaller.
    """
    row: dict = {"n_pairs": len(hidden)}
    row["w_norm"] = float(model.head_weight_norm()) if model is not None else math.nan
    row.update({f"h_norm_{k}": v for k, v in norm_stats(hidden.all).items()})
    row.update({f"pair_dist_{k}": v for k, v in pair_distance_stats(hidden.chosen, hidden.rejected).items()})
    rows = hidden.all
    if erank_rows is not None:
        if erank_rows > len(rows):
            raise ValueError(f"erank_rows={erank_rows} exceeds the {len(rows)} hidden states of this set")
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), erank_rows, replace=False))]
    row["erank"] = effective_rank(rows)
    row["erank_rows"] = len(rows)
    rewards = hidden.rewards.astype(np.float64)
    row["reward_mean"], row["reward_std"] = float(rewards.mean()), float(rewards.std())
    row["accuracy"] = float(np.mean(hidden.reward_chosen > hidden.reward_rejected))
    losses = bt_losses(hidden.reward_chosen, hidden.reward_rejected)
    row["loss"] = float(losses.mean())
    row["loss_sem"] = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else math.nan
    return row


def bt_losses(reward_chosen, reward_rejected) -> np.ndarray:
    """Per-pair Bradley-Terry loss -log sigmoid(r_c - r_r) = log(1 + exp(-(r_c - r_r))), float64 (N,)."""
    margin = np.asarray(reward_chosen, dtype=np.float64) - np.asarray(reward_rejected, dtype=np.float64)
    return np.logaddexp(0.0, -margin)


def dispersion_summary(hidden: HiddenStates, model=None, split: str = "", *, name: str = "",
                       step: int | None = None, epoch: float | None = None, erank_rows: int | None = None) -> dict:
    """A flat row: model (``name``), split, epoch, step, then every statistic of
    ``dispersion_statistics``. ``pd.DataFrame(rows)`` is the wide table; ``records_frame(rows)``
    the long one (one row per statistic)."""
    return {"model": name, "split": split, "epoch": epoch, "step": step,
            **dispersion_statistics(hidden, model, erank_rows)}


# -- records -> frames --------------------------------------------------------------------------
def records_frame(records: list[dict], wide: bool = False) -> pd.DataFrame:
    """Callback records (or ``dispersion_summary`` rows) as a DataFrame.

    Default: long/tidy, one row per record per statistic, columns = the id columns present
    (model, split, step, epoch, epoch_end) + ``statistic`` + ``value``; plots with e.g.
    ``sns.relplot(data=f, x="step", y="value", col="statistic", kind="line", facet_kws={"sharey": False})``.
    ``wide=True``: one row per record, one column per statistic. Raw lists (pair_distances)
    are left out: see ``distance_frame``.
    """
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in LIST_FIELDS} for r in records])
    if wide or frame.empty:
        return frame
    ids = [c for c in ID_COLUMNS if c in frame.columns]
    return frame.melt(id_vars=ids, var_name="statistic", value_name="value")


def distance_frame(records: list[dict], epoch_ends_only: bool = False) -> pd.DataFrame:
    """Per-pair distances ||h_c - h_r|| of every record, long: id columns (step, epoch, epoch_end,
    and model/split if present) + ``pair`` + ``distance``. For BSR Fig 2 style plots, e.g.
    ``sns.histplot(data=f, x="distance", hue="epoch")``. ``epoch_ends_only`` keeps step 0 and the
    records taken at epoch ends."""
    rows = []
    for r in records:
        if epoch_ends_only and not (r.get("epoch_end") or r.get("step") == 0):
            continue
        ids = {c: r[c] for c in ID_COLUMNS if c in r}
        rows += [{**ids, "pair": i, "distance": d} for i, d in enumerate(r.get("pair_distances", []))]
    return pd.DataFrame(rows, columns=[*[c for c in ID_COLUMNS if any(c in r for r in records)], "pair", "distance"])


# -- during training ----------------------------------------------------------------------------
def _unwrap(model):
    """The RewardModel inside DDP / FSDP / DeepSpeed / torch.compile wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _whole_epoch(state) -> bool:
    """True at the last optimizer step of an epoch (state.epoch = epoch + (step + 1) / steps_in_epoch)."""
    return state.epoch is not None and state.global_step > 0 and abs(state.epoch - round(state.epoch)) < 1e-6


class NormProbeCallback(RecordsCallback):
    """Dispersion statistics of a fixed probe set during training (BSR paper Fig 2 / Table 1).

    Records at train begin (step 0, the untrained model), every ``every_steps`` optimizer steps,
    at the last step of each epoch (``epoch_end`` True) and when training stops mid-epoch
    (``on_epoch_end`` fires then too; ``epoch_end`` False). One record per step. A record is ``{"step", "epoch", "epoch_end", <statistics of
    dispersion_statistics>, "pair_distances": [...]}``; all are in ``self.records``. With
    ``eval_probes`` (held-out, OOD sets) the records at step 0, at epoch ends and the final one
    also hold ``<name>_<statistic>`` of each set: the per-epoch table of the over-training regime
    (``epoch_table``, ``overtraining_from_records``, ``spreading_from_records``).

    Resumable (``rmlib.core.runs.RecordsCallback``): the records are kept in
    ``<output_dir>/norm_records.jsonl`` and in every checkpoint; a resumed run reloads them, so
    the list matches an uninterrupted run.

    Every process computes (a sharded model needs all ranks in the forward); only the main
    process writes files.
    """

    label = "norm records"

    def __init__(self, probe, every_steps: int = 50, batch_size: int = 8, bf16: bool | None = None,
                 filename: str = RECORDS_FILE, eval_probes: Mapping[str, object] | None = None,
                 erank_rows: int | None = None):
        """``probe``: an encoded pair set (``encode_pairs`` output), a few dozen pairs, drawn from the
        TRAINING pairs (its ``accuracy`` / ``loss`` are the training ones).
        ``eval_probes``: ``{name: encoded pair set}`` (e.g. ``heldout`` in-domain pairs, ``ood``
        pairs) measured at step 0, at every epoch end and at the final record (not at the
        ``every_steps`` records: they cost a forward over each set); their statistics are stored
        as ``<name>_<statistic>`` (``heldout_accuracy``, ``ood_h_norm_cv``, ...; no ``w_norm``,
        which is the probe's). ``erank_rows``: effective rank on that many rows of every set, so
        sets of different sizes compare (``dispersion_statistics``).
        ``bf16``: autocast for the probe forward; None follows ``args.bf16``."""
        if every_steps < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 1")
        eval_probes = dict(eval_probes or {})
        for name, encoded in {"probe": probe, **eval_probes}.items():
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(getattr(encoded, "column_names", []))
            if missing:
                raise ValueError(f"{name} must be an encoded pair dataset (rmlib.model.encoding.encode_pairs); "
                                 f"lacks {sorted(missing)}")
            if len(encoded) < 2:
                raise ValueError(f"{name} has {len(encoded)} pairs; needs >= 2 for spread statistics")
            if erank_rows is not None and 2 * len(encoded) < erank_rows:
                raise ValueError(f"erank_rows={erank_rows} exceeds the {2 * len(encoded)} hidden states of {name}")
        bad = [n for n in eval_probes if not re.fullmatch(r"[a-z][a-z0-9]*", str(n))]
        if bad:
            raise ValueError(f"eval probe names must be lowercase letters and digits (they prefix statistics), got {bad}")
        super().__init__()
        self.probe = probe
        self.eval_probes = eval_probes
        self.erank_rows = erank_rows
        self.every_steps = every_steps
        self.batch_size = batch_size
        self.bf16 = bf16
        self.filename = filename

    # -- computing --------------------------------------------------------------------------
    def measure(self, model, bf16: bool = False, with_eval: bool = False) -> dict:
        """Statistics of the probe under ``model`` (no record kept); ``with_eval``: also the eval probes'."""
        model = _unwrap(model)
        hidden = extract_hidden(model, self.probe, batch_size=self.batch_size, bf16=bf16, progress=False)
        stats = dispersion_statistics(hidden, model, self.erank_rows)
        stats["pair_distances"] = pair_distances(hidden.chosen, hidden.rejected).tolist()
        if with_eval:
            stats.update(self.measure_eval(model, bf16))
        return stats

    def measure_eval(self, model, bf16: bool = False) -> dict:
        """``<name>_<statistic>`` of every eval probe under ``model``."""
        model = _unwrap(model)
        out = {}
        for name, encoded in self.eval_probes.items():
            hidden = extract_hidden(model, encoded, batch_size=self.batch_size, bf16=bf16, progress=False)
            stats = dispersion_statistics(hidden, None, self.erank_rows)
            stats.pop("w_norm")
            out.update({f"{name}_{k}": v for k, v in stats.items()})
        return out

    def _has_eval(self, record: dict) -> bool:
        return all(f"{name}_accuracy" in record for name in self.eval_probes)

    def _record(self, args, state, model, epoch_end: bool = False, final: bool = False) -> None:
        bf16 = args.bf16 if self.bf16 is None else self.bf16
        record = {"step": int(state.global_step), "epoch": float(state.epoch or 0.0), "epoch_end": epoch_end}
        with_eval = bool(self.eval_probes) and (state.global_step == 0 or epoch_end or final)
        record.update(self.measure(model, bf16=bf16, with_eval=with_eval))
        self.records.append(record)
        self._write(args, state, self._path(args))

    # -- events (train begin, save and train end: RecordsCallback) ----------------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the last step of an epoch is recorded here, not in on_epoch_end: a checkpoint saved at
        # that step (on_save runs between the two events) must hold its record
        whole = _whole_epoch(state)
        if (state.global_step % self.every_steps == 0 or whole) and not self._has(state.global_step):
            self._record(args, state, model, epoch_end=whole)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # also fired when training stops mid-epoch (max_steps): then a final record, which a
        # later resume from a checkpoint at that step drops, as an uninterrupted run lacks it
        if self._has(state.global_step):
            last, changed = self.records[-1], False
            if _whole_epoch(state) and not last["epoch_end"]:
                last["epoch_end"] = changed = True
            if not self._has_eval(last):  # the final record of a run stopped on the every_steps grid
                bf16 = args.bf16 if self.bf16 is None else self.bf16
                last.update(self.measure_eval(model, bf16))
                changed = True
            if changed:
                self._write(args, state, self._path(args))
        else:
            self._record(args, state, model, epoch_end=_whole_epoch(state), final=True)


# -- per epoch: the over-training regime (issue 19) -------------------------------------------------
EPOCH_COLUMNS = ("accuracy", "loss", "h_norm_mean", "h_norm_std", "h_norm_cv", "pair_dist_mean", "pair_dist_std",
                 "reward_mean", "reward_std", "w_norm", "erank")


def epoch_table(records: list[dict]) -> pd.DataFrame:
    """One row per epoch end (and the step-0 record, epoch 0) of ``NormProbeCallback`` records,
    wide: step, epoch, and every statistic (the probe's, ``accuracy`` = training accuracy, and the
    eval probes' ``<name>_<statistic>``); pair distance lists left out."""
    rows = [r for r in records if r.get("epoch_end") or r.get("step") == 0]
    frame = records_frame(rows, wide=True)
    if frame.empty:
        return frame
    return frame.sort_values("step").reset_index(drop=True)


def _epoch_ends(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("epoch_end")]


def overtraining_from_records(records: list[dict], heldout: str = "heldout") -> claims.Regime:
    """``claims.overtraining_reached`` on the epoch-end records: training accuracy (the probe's),
    held-out accuracy, loss and loss SEM of the eval probe ``heldout``, its pair count as n."""
    ends = _epoch_ends(records)
    missing = [r["step"] for r in ends if f"{heldout}_accuracy" not in r]
    if missing:
        raise ValueError(f"epoch-end records at steps {missing} lack {heldout!r} statistics: pass "
                         f"eval_probes={{{heldout!r}: ...}} to NormProbeCallback")
    if not ends:
        return claims.overtraining_reached([], [], 1)
    return claims.overtraining_reached([r["accuracy"] for r in ends], [r[f"{heldout}_accuracy"] for r in ends],
                                       int(ends[0][f"{heldout}_n_pairs"]),
                                       heldout_loss=[r[f"{heldout}_loss"] for r in ends],
                                       heldout_loss_sem=[r[f"{heldout}_loss_sem"] for r in ends])


def spreading_from_records(records: list[dict], prefix: str = "") -> claims.Regime:
    """``claims.spreads_hidden_states`` on the epoch-end records: mean ||h_c - h_r|| and the CV of
    ||h|| of the probe (``prefix=""``) or of an eval probe (``prefix="heldout_"``)."""
    ends = _epoch_ends(records)
    return claims.spreads_hidden_states({m: [r[f"{prefix}{m}"] for r in ends if f"{prefix}{m}" in r]
                                         for m in claims.GROWTH_METRICS})


def summaries_from_records(records: Mapping[str, list[dict]], sets: tuple[str, ...] = ("heldout", "ood"),
                           train_split: str = "train") -> pd.DataFrame:
    """``dispersion_summary``-shaped rows from each model's LAST ``NormProbeCallback`` record, no
    extra forward: split ``train_split`` = the training probe's statistics, and one split per eval
    probe in ``sets`` (its ``<set>_<statistic>`` values, prefix removed). Feeds ``erank_shift_table``
    and ``dispersion_findings`` for runs trained with eval probes (the zoo of notebook 04)."""
    rows = []
    for model, recs in records.items():
        if not recs:
            raise ValueError(f"{model}: no records")
        last = recs[-1]
        missing = [name for name in sets if f"{name}_accuracy" not in last]
        if missing:
            raise ValueError(f"{model}: the last record lacks eval probe(s) {missing}")
        prefixes = tuple(f"{name}_" for name in sets)
        own = {k: v for k, v in last.items() if k not in (*ID_COLUMNS, *LIST_FIELDS) and not k.startswith(prefixes)}
        rows.append({"model": model, "split": train_split, "epoch": last.get("epoch"), "step": last.get("step"), **own})
        for name in sets:
            stats = {k[len(name) + 1:]: v for k, v in last.items() if k.startswith(f"{name}_")}
            rows.append({"model": model, "split": name, "epoch": last.get("epoch"), "step": last.get("step"), **stats})
    return pd.DataFrame(rows)


# -- comparing reward models -------------------------------------------------------------------
def hidden_norm_frame(hidden_by_split: dict[str, HiddenStates], model: str) -> pd.DataFrame:
    """||h|| of every reply (chosen and rejected) per evaluation split, long: model, split, h_norm
    (BSR paper Fig 3: BT's norms spread across validation sets, BSR's stay in a narrow band)."""
    frames = [pd.DataFrame({"model": model, "split": split, "h_norm": np.linalg.norm(h.all, axis=1)})
              for split, h in hidden_by_split.items()]
    return pd.concat(frames, ignore_index=True)


def erank_shift_table(summaries: pd.DataFrame, train_split: str = "train") -> pd.DataFrame:
    """Effective rank on the training probe vs every other split, per model (BSR paper Table 1:
    BT 23.34 -> 33.76, BSR 33.45 -> 33.59 at 8B scale). ``summaries``: ``dispersion_summary``
    rows (model, split, erank, ...), computed on equally many rows (``erank_rows``): the effective
    rank grows with the number of rows. Columns: model, split, erank_train, erank, shift."""
    if "erank_rows" in summaries and summaries["erank_rows"].nunique() > 1:
        raise ValueError(f"effective ranks on different numbers of rows ({sorted(summaries['erank_rows'].unique())})"
                         " do not compare: pass the same erank_rows to every dispersion_summary")
    if train_split not in set(summaries["split"]):
        raise ValueError(f"no {train_split!r} split in the summaries; have {sorted(set(summaries['split']))}")
    train = summaries[summaries["split"] == train_split].set_index("model")["erank"]
    rest = summaries[summaries["split"] != train_split][["model", "split", "erank"]].copy()
    rest.insert(2, "erank_train", rest["model"].map(train))
    rest["shift"] = rest["erank"] - rest["erank_train"]
    return rest.reset_index(drop=True)


def dispersion_findings(records: dict[str, list[dict]], summaries: pd.DataFrame, baseline: str = "bt",
                        train_split: str = "train") -> pd.DataFrame:
    """What the measurements say about each model vs ``baseline``, one row per claim of the BSR
    paper §4, computed from the records (no judgement typed in):

    - ``pair_dist_growth``: mean and std of ||h_c - h_r|| on the probe, last record / step 0
      (paper: grows under BT, epoch by epoch);
    - ``h_norm_spread``: coefficient of variation of the per-split mean ||h|| across the evaluation
      splits (paper: BSR keeps ||h|| in a narrower band than BT);
    - ``erank_shift``: mean |erank(split) - erank(train)| (paper: BT shifts by +10.4, BSR by +0.1).
    ``verdict`` is ``claims.relative_verdict`` with the paper's direction (lower than the baseline):
    reproduced / not at this scale (within 5%) / opposite; empty on the baseline's rows."""
    rows = []
    for model, recs in records.items():
        first, last = recs[0], recs[-1]
        rows.append({"model": model, "claim": "pair_dist_growth_mean",
                     "value": last["pair_dist_mean"] / first["pair_dist_mean"]})
        rows.append({"model": model, "claim": "pair_dist_growth_std",
                     "value": last["pair_dist_std"] / first["pair_dist_std"]})
    evals = summaries[summaries["split"] != train_split]
    for model, g in evals.groupby("model"):
        means = g["h_norm_mean"].to_numpy(dtype=float)
        rows.append({"model": model, "claim": "h_norm_spread_across_splits", "value": float(means.std() / means.mean())})
    shifts = erank_shift_table(summaries, train_split)
    for model, g in shifts.groupby("model"):
        rows.append({"model": model, "claim": "erank_shift_abs_mean", "value": float(g["shift"].abs().mean())})
    out = pd.DataFrame(rows)
    base = out[out["model"] == baseline].set_index("claim")["value"]
    out["baseline"] = out["claim"].map(base)
    out["verdict"] = [None if m == baseline else claims.relative_verdict(v, b, want="lower")
                      for m, v, b in zip(out["model"], out["value"], out["baseline"])]
    return out


def mitigation_findings(findings: pd.DataFrame, bt_regime: claims.Regime) -> pd.DataFrame:
    """``dispersion_findings`` with the claims read as mitigations (issue 19): ``rule_verdict`` keeps
    rule 3's verdict against the baseline, ``verdict`` becomes ``claims.mitigation_verdict(bt_regime,
    rule_verdict)`` ("keeps the spread in check" is tested only where BT spreads the hidden states,
    ``spreading_from_records`` of the baseline); the baseline's own rows stay without a verdict."""
    out = findings.copy()
    out["rule_verdict"] = out["verdict"]
    out["verdict"] = [None if v is None or (isinstance(v, float) and math.isnan(v))
                      else claims.mitigation_verdict(bt_regime, v) for v in out["rule_verdict"]]
    return out
