"""Plots the notebooks render into ``figures/``. Each takes a tidy DataFrame, returns a Figure.

Save with ``rmlib.results.save_figure_atomic`` so a failed run never leaves half a file.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

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

    ``history``: rows of the Trainer log (``rmlib.train.log_history_frame``), optionally
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


def head_norm_curves(records: pd.DataFrame):
    """||W_p|| against the optimizer step, one line per model (BSR paper Fig 1 analogue).
    ``records``: wide callback records with ``model``, ``step`` and ``w_norm`` columns."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    sns.lineplot(data=records, x="step", y="w_norm", hue="model", marker="o", markersize=3, ax=ax)
    ax.set_ylabel("||W_p||")
    ax.set_title("Reward-head norm during training")
    fig.tight_layout()
    return fig


def pair_distances_by_epoch(distances: pd.DataFrame):
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
    fig.suptitle("Hidden-state distance of chosen vs rejected, per epoch")
    fig.tight_layout()
    return fig


def hidden_norms_by_split(frame: pd.DataFrame):
    """||h|| distributions per evaluation split, one box per model (BSR paper Fig 3 analogue).
    ``frame``: ``rmlib.norms.hidden_norm_frame`` rows of several models."""
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
    ``summaries``: ``rmlib.norms.dispersion_summary`` rows (model, split, erank), equal row counts."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * summaries["split"].nunique(), 3.6))
    sns.barplot(data=summaries, x="split", y="erank", hue="model", ax=ax)
    rows = summaries["erank_rows"].iloc[0] if "erank_rows" in summaries else "?"
    ax.set_ylabel(f"effective rank ({rows} hidden states)")
    ax.set_title("Effective rank, training probe vs evaluation sets" + (f"\n{paper}" if paper else ""), fontsize=10)
    fig.tight_layout()
    return fig
