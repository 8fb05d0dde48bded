"""RLOO curves summarized: per run, the last tracked step against step 0 (gold and proxy change
with standard errors, KL, length change), the sentences the notebook prints from it, and whether
the run over-optimizes (``overoptimization_by_run``: ``claims.rl_overoptimizes``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from rmlib.analysis import claims


def _z(delta: float, sem: float) -> float:
    """delta / sem; +-inf for a nonzero delta with zero spread, 0 for no change, NaN if unknown."""
    if not (np.isfinite(delta) and np.isfinite(sem)):
        return math.nan
    if sem > 0:
        return float(delta / sem)
    return 0.0 if delta == 0 else math.copysign(math.inf, delta)


def summary_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last tracked step against step 0 (``curves`` needs a ``run`` column).

    Columns: run, steps, kl, proxy_delta (+ sem, and in step-0 standard deviations), gold_delta
    (+ sem), gold_delta_z = gold_delta / gold_delta_sem, gold_win_rate, length_tokens at 0 and at
    the end, length_change (relative)."""
    rows = []
    for run, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        first, last = g.iloc[0], g.iloc[-1]
        sem = last["gold_delta_sem"]
        rows.append({
            "run": run, "steps": int(last["step"]), "kl": last["kl"], "kl_sem": last["kl_sem"],
            "proxy_delta": last["proxy_delta"], "proxy_delta_sem": last["proxy_delta_sem"],
            "proxy_delta_in_std0": last["proxy_delta"] / first["proxy_std0"] if first["proxy_std0"] else math.nan,
            "gold_delta": last["gold_delta"], "gold_delta_sem": sem,
            "gold_delta_z": _z(last["gold_delta"], sem),
            "gold_win_rate": last["gold_win_rate"], "length_tokens_start": first["length_tokens"],
            "length_tokens_end": last["length_tokens"],
            "length_change": last["length_tokens"] / first["length_tokens"] - 1 if first["length_tokens"] else math.nan,
        })
    return pd.DataFrame(rows)


def describe_runs(table: pd.DataFrame) -> str:
    """Plain sentences computed from ``summary_table``: per run, the gold change and whether it
    exceeds Z_95 = 1.96 standard errors (``claims.z_verdict``), the proxy change, KL and length
    change. Claims nothing else."""
    lines = []
    for r in table.itertuples():
        verdict = claims.z_verdict(r.gold_delta, r.gold_delta_sem, want="higher")
        if verdict == claims.NOT_RUN or np.isnan(r.gold_delta_z):
            verdict = "no step-0 record to compare with"
        elif verdict == claims.NOT_AT_SCALE:
            verdict = f"within {claims.Z_95:g} standard errors of no change"
        else:
            verdict = f"{'up' if r.gold_delta > 0 else 'down'} beyond {claims.Z_95:g} standard errors"
        lines.append(
            f"- **{r.run}** (step {r.steps}, KL {r.kl:.3g} ± {r.kl_sem:.2g} nats): proxy reward "
            f"{r.proxy_delta:+.3g} ({r.proxy_delta_in_std0:+.2f} initial std); gold reward {r.gold_delta:+.3g} "
            f"± {r.gold_delta_sem:.2g} ({verdict}); gold win rate vs the initial policy {r.gold_win_rate:.2f}; "
            f"mean length {r.length_tokens_start:.1f} -> {r.length_tokens_end:.1f} tokens ({r.length_change:+.0%})."
        )
    return "\n".join(lines)


def overoptimization_by_run(curves: pd.DataFrame) -> dict[str, claims.Regime]:
    """Per run of ``curves`` (columns run, step, gold_delta, proxy_delta): ``claims.rl_overoptimizes``
    on its tracked records, gold and proxy change against the step. ``Regime.line()`` is the
    "BT over-optimizes here" line of the run."""
    missing = sorted({"run", "step", "gold_delta", "proxy_delta"} - set(curves.columns))
    if missing:
        raise ValueError(f"curves lacks columns {missing}")
    return {run: claims.rl_overoptimizes(g["step"].to_numpy(float), g["gold_delta"].to_numpy(float),
                                         g["proxy_delta"].to_numpy(float))
            for run, g in curves.groupby("run", sort=False)}


# -- arms: (proxy, beta) runs of notebook 05 (issue 19: a beta = 0 arm) --------------------------------
def arm_name(proxy: str, beta: float) -> str:
    """Run name of an RLOO arm: ``bt_beta0``, ``bsr_beta0.05``."""
    return f"{proxy}_beta{float(beta):g}"


def check_arms(arms, proxies) -> dict[str, tuple[str, float]]:
    """``{arm_name: (proxy, beta)}`` from ``arms`` = [[proxy, beta], ...]; every proxy must be one of
    ``proxies`` and every beta a number >= 0; no arm twice. ValueError naming what is wrong."""
    out = {}
    for arm in arms:
        if not (isinstance(arm, (list, tuple)) and len(arm) == 2):
            raise ValueError(f"each arm is [proxy, beta], got {arm!r}")
        proxy, beta = arm
        if proxy not in proxies:
            raise ValueError(f"arm {arm!r}: proxy {proxy!r} is not among proxy_rm_dirs ({', '.join(proxies)})")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"arm {arm!r}: beta must be a finite number >= 0")
        name = arm_name(proxy, beta)
        if name in out:
            raise ValueError(f"arm {arm!r} is given twice")
        out[name] = (proxy, float(beta))
    if not out:
        raise ValueError("arms is empty: give at least one [proxy, beta]")
    return out


def regime_table(regimes: dict[str, claims.Regime], arms: dict[str, tuple[str, float]]) -> pd.DataFrame:
    """One row per run: its proxy and beta, ``claims.rl_overoptimizes``' answer, test, numbers and the
    line "<PROXY> over-optimizes here: yes/no (...)"."""
    rows = []
    for run, regime in regimes.items():
        proxy, beta = arms.get(run, (run, math.nan))
        rows.append({"experiment": "05_rloo", "run": run, "proxy": proxy, "beta": beta, "reached": regime.reached,
                     "test": regime.test, "numbers": regime.numbers,
                     "line": f"{run}: " + regime.line(f"{proxy.upper()} over-optimizes here")})
    return pd.DataFrame(rows)


def mitigation_table(table: pd.DataFrame, regimes: dict[str, claims.Regime], arms: dict[str, tuple[str, float]],
                     baseline: str = "bt") -> pd.DataFrame:
    """Per non-baseline arm with a baseline arm at the same beta: the BSR paper's RLOO claims (§3.3),
    "gains more gold than BT" (difference of the gold changes, independent runs: ``combined_sem``,
    ``claims.z_verdict``) through ``claims.mitigation_verdict`` with the BT arm's regime, and
    "gives shorter answers" (rule 3 on the final length; a length claim, not a mitigation one)."""
    s = table.set_index("run")
    base_by_beta = {beta: run for run, (proxy, beta) in arms.items() if proxy == baseline and run in s.index}
    rows = []
    for run, (proxy, beta) in arms.items():
        if proxy == baseline or run not in s.index or beta not in base_by_beta:
            continue
        b, v = s.loc[base_by_beta[beta]], s.loc[run]
        d = float(v["gold_delta"] - b["gold_delta"])
        sem = claims.combined_sem(v["gold_delta_sem"], b["gold_delta_sem"])
        rule = claims.z_verdict(d, sem, want="higher")
        rows.append({"run": run, "baseline_run": base_by_beta[beta], "beta": beta,
                     "claim": f"RLOO against {proxy} gains more gold reward than against BT (beta {beta:g}; BSR §3.3)",
                     "ours": f"{v['gold_delta']:+.3f} vs BT {b['gold_delta']:+.3f} (noise {claims.z_noise(sem):.3f})",
                     "rule_verdict": rule, "verdict": claims.mitigation_verdict(regimes[base_by_beta[beta]], rule)})
        length = claims.relative_verdict(float(v["length_tokens_end"]), float(b["length_tokens_end"]), want="lower")
        rows.append({"run": run, "baseline_run": base_by_beta[beta], "beta": beta,
                     "claim": f"RLOO against {proxy} gives shorter answers than against BT (beta {beta:g}; BSR Table 4)",
                     "ours": f"{v['length_tokens_end']:.1f} vs BT {b['length_tokens_end']:.1f} tokens",
                     "rule_verdict": length, "verdict": length})
    return pd.DataFrame(rows, columns=["run", "baseline_run", "beta", "claim", "ours", "rule_verdict", "verdict"])
