"""Plots the notebooks render into ``figures/``. Each takes a tidy DataFrame, returns a Figure.

Save with ``rmlib.core.atomic_io.save_figure_atomic`` so a failed run never leaves half a file.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from rmlib.analysis.bon import kl_bon, variant_curves
from rmlib.analysis.synthetic_gold import ORACLE, VARIANT_LABELS
from rmlib.reward.variants import VARIANTS


def rloo_curves_figure(curves: pd.DataFrame, title: str = ""):
    """Four panels, one line per run: proxy reward (change from step 0, in units of its step-0
    standard deviation) vs KL; gold reward change vs step and vs KL (±1 standard error of the
    paired change); mean response length vs step."""

    hue = "run" if "run" in curves.columns else None
    groups = list(curves.groupby(hue, sort=False)) if hue else [("", curves)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for name, g in groups:
        g = g.sort_values("step")
        std0 = g["proxy_std0"].iloc[0]
        proxy_z = g["proxy_delta"] / std0 if std0 else g["proxy_delta"]
        (line,) = axes[0].plot(g["kl"], proxy_z, marker="o", ms=3, label=name)
        color = line.get_color()
        axes[1].plot(g["step"], g["gold_delta"], marker="o", ms=3, color=color, label=name)
        axes[1].fill_between(g["step"], g["gold_delta"] - g["gold_delta_sem"], g["gold_delta"] + g["gold_delta_sem"],
                             color=color, alpha=0.15)
        axes[2].errorbar(g["kl"], g["gold_delta"], yerr=g["gold_delta_sem"], marker="o", ms=3, color=color,
                         capsize=2, label=name)
        axes[3].plot(g["step"], g["length_tokens"], marker="o", ms=3, color=color, label=name)
    labels = [("KL(pi || pi_0) [nats]", "proxy reward - step 0 [initial std]", "proxy reward vs KL"),
              ("step", "gold reward - step 0", "gold reward vs step"),
              ("KL(pi || pi_0) [nats]", "gold reward - step 0", "gold reward vs KL"),
              ("step", "mean response length [tokens]", "response length")]
    for ax, (x, y, t) in zip(axes, labels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(t)
        ax.grid(alpha=0.3)
    if hue:
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_bon_curves(curves: pd.DataFrame, policy: str | None = None, title: str = ""):
    """GRM Fig 2 style, one figure per policy: one panel per variant with the proxy score (dashed) and
    the gold score (solid) of the proxy's pick vs KL_bon, both normalized to 0 at n = 1, seed-mean
    lines with a band of +-1 sd across seeds (+-1 SEM across prompts with a single seed); a last
    panel overlays every variant's gold curve and the oracle (gold picking for itself)."""

    if policy is not None:
        curves = curves[curves["policy"] == policy]
    if curves.empty:
        raise ValueError(f"no curves for policy {policy!r}")
    mean = variant_curves(curves)
    variants = _variant_order(mean["variant"])
    colors = _variant_colors(variants)
    fig, axes = plt.subplots(1, len(variants) + 1, figsize=(3.4 * (len(variants) + 1), 3.3), sharey=True,
                             squeeze=False)
    axes = axes[0]

    def band(ax, g, col, color):
        sd = g[f"{col}_sd"] if g["n_seeds"].iloc[0] > 1 else g[f"{col.removesuffix('_norm')}_sem"]
        ax.fill_between(g["kl_bon"], g[col] - sd, g[col] + sd, color=color, alpha=0.18, lw=0)

    for ax, variant in zip(axes, variants):
        g = mean[mean["variant"] == variant].sort_values("n")
        c = colors[variant]
        ax.plot(g["kl_bon"], g["proxy_norm"], ls="--", color=c, label="proxy")
        band(ax, g, "proxy_norm", c)
        ax.plot(g["kl_bon"], g["gold_norm"], ls="-", color=c, marker="o", ms=3, label="gold")
        band(ax, g, "gold_norm", c)
        ax.axhline(0, color="k", lw=0.6)
        seeds = "" if (g["n_seeds"].iloc[0] == 1 and variant not in VARIANTS) else f" ({int(g['n_seeds'].iloc[0])} seed(s))"
        ax.set_title(f"{VARIANT_LABELS.get(variant, variant)}{seeds}")  # an ensemble is one curve of several seeds
        ax.set_xlabel("KL_bon = log n - (n-1)/n")
    axes[0].set_ylabel("score - score at n=1")
    axes[0].legend(loc="upper left", fontsize=8)
    ax = axes[-1]
    for variant in variants:
        g = mean[mean["variant"] == variant].sort_values("n")
        ax.plot(g["kl_bon"], g["gold_norm"], color=colors[variant], marker="o", ms=3,
                label=VARIANT_LABELS.get(variant, variant))
    if ORACLE in set(mean["variant"]):
        g = mean[mean["variant"] == ORACLE].sort_values("n")
        ax.plot(g["kl_bon"], g["gold_norm"], color="0.5", ls=":", label=VARIANT_LABELS[ORACLE])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title("gold score of the pick, all proxies")
    ax.set_xlabel("KL_bon")
    ax.legend(fontsize=7)
    top = (policy or curves["policy"].iloc[0] or "policy")
    fig.suptitle(title or f"Best-of-n with a synthetic gold RM: {top}")
    fig.tight_layout()
    return fig


TRAINING_PANELS = {
    "loss/bt": "Bradley-Terry loss",
    "rewards/accuracy": "train batch accuracy",
    "rewards/std": "reward std (batch)",
    "rewards/mean": "reward mean (batch)",
    "model/head_norm": "||W_p||",
    "hidden/norm_mean": "mean ||h|| (last token)",
    "loss/reg": "GRM regularizer",
}


def training_curves(history: pd.DataFrame, title: str = "", eval_accuracy: float | None = None):
    """Small multiples of the logged training metrics against the optimizer step.

    ``history``: rows of the Trainer log (``rmlib.reward.trainer.log_history_frame``), optionally
    with a ``run`` column to overlay several runs.
    """
    panels = [c for c in TRAINING_PANELS if c in history.columns and history[c].notna().any()
              and not (c == "loss/reg" and (history[c] == 0).all())]
    if not panels:
        raise ValueError("no training metrics logged: lower logging_steps below the number of steps")
    ncols = 3
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    hue = "run" if "run" in history.columns else None
    for ax, col in zip(axes.flat, panels):
        sns.lineplot(data=history, x="step", y=col, hue=hue, ax=ax, marker="o", markersize=3, legend=ax is axes.flat[0])
        ax.set_title(TRAINING_PANELS[col])
        ax.set_ylabel("")
        ax.ticklabel_format(axis="y", useOffset=False)
        if col == "rewards/accuracy" and eval_accuracy is not None:
            ax.axhline(eval_accuracy, ls="--", c="k", lw=1)
            ax.text(ax.get_xlim()[0], eval_accuracy, f" held-out {eval_accuracy:.3f}", va="bottom", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def levers(noise: float | None = None, n: int | None = None, epochs: float | None = None,
           steps: int | None = None, **more) -> str:
    """The levers of the over-optimization regime, for a figure title (issue 19: every figure states
    them): ``"noise 25%, N = 96 (KL_bon 3.58), 5 epochs, 30 steps"`` plus ``more`` as ``name value``."""
    parts = []
    if noise is not None:
        parts.append(f"label noise {noise:.0%}")
    if n is not None:
        parts.append(f"N = {n} (KL_bon {float(kl_bon(int(n))):.2f})")
    if epochs is not None:
        parts.append(f"{epochs:g} epoch(s)")
    if steps is not None:
        parts.append(f"{steps} steps")
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in more.items() if v is not None]
    return ", ".join(parts)


def _variant_order(names) -> list[str]:
    """Known variants in their registry order, then ensembles and others (the oracle left out)."""
    present = list(dict.fromkeys(names))
    known = [v for v in VARIANTS if v in present]
    return known + [v for v in present if v not in known and v != ORACLE]


def _variant_colors(variants) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


def gao_fit_figure(curves: pd.DataFrame, fits: pd.DataFrame, title: str = ""):
    """Gao et al.'s fit over the measured Best-of-N gold curve, one panel per variant: the seed-mean
    gold change of the pick (points, +-1.96 SEM over prompts), the fitted d (alpha - beta d),
    d = sqrt(KL_bon) (line) and, where beta > 0, the peak KL* with its 95% bootstrap interval (span).
    ``curves``: ``bon.bon_curves`` rows of one policy and level; ``fits``: ``gao_fit.fit_table`` rows
    (the variant rows, rm "", are used)."""
    import numpy as np

    from rmlib.analysis.gao_fit import fitted_curve

    mean = variant_curves(curves)
    rows = fits[fits["rm"] == ""].set_index("variant")
    variants = [v for v in _variant_order(mean["variant"]) if v in rows.index]
    if not variants:
        raise ValueError("no variant has both curves and a fit")
    colors = _variant_colors(variants)
    fig, axes = plt.subplots(1, len(variants), figsize=(3.4 * len(variants), 3.3), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        g = mean[mean["variant"] == variant].sort_values("n")
        f, c = rows.loc[variant], colors[variant]
        ax.errorbar(g["kl_bon"], g["gold_norm"], yerr=1.96 * g["gold_sem"], fmt="o", ms=3, color=c, capsize=2,
                    label="gold of the pick")
        kl = np.linspace(0, float(g["kl_bon"].max()), 100)
        ax.plot(kl, fitted_curve(f["alpha"], f["beta"], kl), color=c, label="Gao fit")
        if f["beta"] > 0 and np.isfinite(f["kl_star"]):
            lo, hi = f.get("kl_star_low", np.nan), min(f.get("kl_star_high", np.nan), float(kl.max()))
            if np.isfinite(lo) and np.isfinite(hi) and lo < hi:
                ax.axvspan(lo, hi, color=c, alpha=0.12, lw=0, label="KL* 95% interval")
            if f["kl_star"] <= kl.max():
                ax.axvline(f["kl_star"], color=c, ls=":", lw=1)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{VARIANT_LABELS.get(variant, variant)}\nbeta {f['beta']:.3f} "
                     f"[{f.get('beta_low', np.nan):.3f}, {f.get('beta_high', np.nan):.3f}]", fontsize=9)
        ax.set_xlabel("KL_bon")
    axes[0][0].set_ylabel("gold - gold at n=1")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "Gao fit of the Best-of-N gold curves")
    fig.tight_layout()
    return fig


def epoch_curves(table: pd.DataFrame, title: str = ""):
    """Notebook 01 under over-training: one line per model across epoch ends (epoch 0 = the untrained
    model) for training / held-out / OOD accuracy (+-1.96 binomial SE), held-out BT loss (+-1.96 SEM), mean ||h_c - h_r||,
    CV of ||h|| and effective rank (probe). ``table``: ``dispersion.epoch_table`` rows with a
    ``model`` column."""
    panels = [(c, t) for c, t in [("accuracy", "train accuracy (probe)"), ("heldout_accuracy", "held-out accuracy"),
                                  ("ood_accuracy", "OOD accuracy"), ("heldout_loss", "held-out BT loss"),
                                  ("pair_dist_mean", "mean ||h_c - h_r|| (probe)"), ("h_norm_cv", "CV of ||h|| (probe)"),
                                  ("erank", "effective rank (probe)")] if c in table.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.3), squeeze=False)
    for ax, (col, name) in zip(axes[0], panels):
        for model, g in table.groupby("model", sort=False):
            g = g.sort_values("epoch")
            sem = g.get(f"{col}_sem") if col.endswith("_loss") else None
            n = g.get(col.replace("accuracy", "n_pairs")) if col.endswith("accuracy") else None
            if n is not None:  # binomial standard error of an accuracy on n pairs
                sem = (g[col] * (1 - g[col]) / n) ** 0.5
            if sem is not None:
                ax.errorbar(g["epoch"], g[col], yerr=1.96 * sem, marker="o", ms=3, capsize=2, label=model)
            else:
                ax.plot(g["epoch"], g[col], marker="o", ms=3, label=model)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def head_norm_curves(records: pd.DataFrame, title: str = ""):
    """||W_p|| against the optimizer step, one line per model (BSR paper Fig 1 analogue).
    ``records``: wide callback records with ``model``, ``step`` and ``w_norm`` columns."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=records, x="step", y="w_norm", hue="model", marker="o", markersize=3, ax=ax)
    ax.set_ylabel("||W_p||")
    ax.set_title(title or "Reward-head norm during training", fontsize=9)
    fig.tight_layout()
    return fig


def pair_distances_by_epoch(distances: pd.DataFrame, title: str = ""):
    """Distribution of ||h(x,y_c) - h(x,y_r)|| on the probe pairs per epoch, one panel per model
    (BSR paper Fig 2 analogue; epoch 0 = the untrained backbone)."""
    d = distances.copy()
    d["epoch"] = d["epoch"].round(2).astype(str)
    models = list(dict.fromkeys(d["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), sharey=True, squeeze=False)
    for ax, model in zip(axes.flat, models):
        sns.violinplot(data=d[d["model"] == model], x="epoch", y="distance", ax=ax, cut=0, inner="quartile",
                       color="#9ecae1")
        ax.set_title(model)
        ax.set_ylabel("||h_c - h_r||")
    fig.suptitle(title or "Hidden-state distance of chosen vs rejected, per epoch")
    fig.tight_layout()
    return fig


def hidden_norms_by_split(frame: pd.DataFrame):
    """||h|| distributions per evaluation split, one box per model (BSR paper Fig 3 analogue).
    ``frame``: ``rmlib.analysis.dispersion.hidden_norm_frame`` rows of several models."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * frame["split"].nunique(), 3.6))
    sns.boxplot(data=frame, x="split", y="h_norm", hue="model", ax=ax, fliersize=1.5)
    ax.set_ylabel("||h|| (last token, final layer)")
    ax.set_title("Hidden-state norms on in- and out-of-distribution sets")
    fig.tight_layout()
    return fig


def metric_by_variant(table: pd.DataFrame, x: str = "label", col: str = "scenario", title: str = ""):
    """Point estimates with their 95% intervals, one panel per ``col`` value and one point per seed.
    ``table``: tidy rows with ``value``, ``ci_low``, ``ci_high``, ``seed`` and the ``x``/``col`` columns."""
    panels = list(dict.fromkeys(table[col]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), squeeze=False)
    order = list(dict.fromkeys(table[x]))
    seeds = sorted(table["seed"].unique()) if "seed" in table else [None]
    for ax, panel in zip(axes.flat, panels):
        sub = table[table[col] == panel]
        for k, seed in enumerate(seeds):
            s = sub if seed is None else sub[sub["seed"] == seed]
            pos = [order.index(v) + (k - (len(seeds) - 1) / 2) * 0.15 for v in s[x]]
            ax.errorbar(pos, s["value"], yerr=[s["value"] - s["ci_low"], s["ci_high"] - s["value"]], fmt="o",
                        capsize=3, ms=4, label=None if seed is None else f"seed {seed}")
        ax.set_xticks(range(len(order)), order, rotation=35, ha="right")
        ax.set_title(str(panel))
        metric = sub["metric"].iloc[0] if "metric" in sub and len(sub) else ""
        ax.set_ylabel(metric)
    if len(seeds) > 1:
        axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def effective_rank_by_split(summaries: pd.DataFrame, paper: str = ""):
    """Effective rank of the hidden-state matrix on the training probe and each evaluation set,
    one bar per model (BSR paper Table 1 analogue: a small train -> eval shift is the healthy case).
    ``summaries``: ``rmlib.analysis.dispersion.dispersion_summary`` rows (model, split, erank), equal row counts."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * summaries["split"].nunique(), 3.6))
    sns.barplot(data=summaries, x="split", y="erank", hue="model", ax=ax)
    rows = summaries["erank_rows"].iloc[0] if "erank_rows" in summaries else "?"
    ax.set_ylabel(f"effective rank ({rows} hidden states)")
    ax.set_title("Effective rank, training probe vs evaluation sets" + (f"\n{paper}" if paper else ""), fontsize=10)
    fig.tight_layout()
    return fig
