"""rmlib.pipeline.report: the README results section is computed from the tables and figures the
notebooks record in the results manifest (verdict rules, "not run", layout, markers)."""

from __future__ import annotations

import ast
import json
import re

import pandas as pd
import pytest

from rmlib.analysis import claims
from rmlib.core import manifest
from rmlib.core.paths import REPO_ROOT
from rmlib.pipeline import report
from rmlib.pipeline.presets import NOTEBOOK_DIR


def write(run, notebook, role, name, frame):
    """A table under an arbitrary file name, recorded as the notebook would."""
    path = run / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    manifest.record_result(run, notebook, role, path)


@pytest.fixture
def results(tmp_path):
    run = tmp_path / "runs"
    write(run, report.TRAIN, "training", "train_bt.csv",
          pd.DataFrame([{"run": "bt", "loss": "bt", "regularizer": "none", "mode": "topk", "eval_accuracy": 0.66,
                         "train_pairs": 1800}]))
    write(run, report.NORMS, "findings", "norm_findings.csv", pd.DataFrame([
        {"model": "bt", "claim": "pair_dist_growth_mean", "value": 1.5, "baseline": 1.5},
        {"model": "bsr", "claim": "pair_dist_growth_mean", "value": 1.1, "baseline": 1.5},
        {"model": "bt", "claim": "h_norm_spread_across_splits", "value": 0.10, "baseline": 0.10},
        {"model": "bsr", "claim": "h_norm_spread_across_splits", "value": 0.101, "baseline": 0.10},
        {"model": "bt", "claim": "erank_shift_abs_mean", "value": 2.0, "baseline": 2.0},
        {"model": "bsr", "claim": "erank_shift_abs_mean", "value": 3.0, "baseline": 2.0},
    ]))
    write(run, report.SCENARIOS, "verdicts", "v.csv", pd.DataFrame([
        {"variant": "bsr", "measure": "val2_prompt_ood", "difference": 0.05, "noise": 0.01, "verdict": "higher"},
        {"variant": "grm", "measure": "hhh", "difference": 0.01, "noise": 0.03, "verdict": "within noise"},
        {"variant": "bsr_1e-2", "measure": "hhh", "difference": -0.2, "noise": 0.03, "verdict": "lower"}]))
    write(run, report.SCENARIOS, "table5", "t5.csv", pd.DataFrame([{"label": "BT", "scenario": "val1_in_domain", "value": 0.6}]))
    write(run, report.SCENARIOS, "table1", "t1.csv", pd.DataFrame([{"label": "BT", "metric": "hhh", "value": 0.5}]))
    return tmp_path


def bon_summary():
    row = dict(policy="pol", n_seeds=2, n_final=16, kl_final=1.8, proxy_norm_final=0.7, gold_norm_final=0.2,
               n_gold_peak=8, gold_bends_down=True)
    return pd.DataFrame([{**row, "variant": "bt", "gold_minus_bt": 0.0, "gold_minus_bt_sem": 0.0},
                         {**row, "variant": "bsr", "gold_minus_bt": 0.0197, "gold_minus_bt_sem": 0.01},
                         {**row, "variant": "grm", "gold_minus_bt": -0.0195, "gold_minus_bt_sem": 0.01}])


def rloo_summary():
    return pd.DataFrame([{"run": "bt", "gold_delta": 0.0, "gold_delta_sem": 0.06, "length_tokens_end": 50.0},
                         {"run": "bsr", "gold_delta": 0.2, "gold_delta_sem": 0.08, "length_tokens_end": 40.0}])


@pytest.fixture
def full_results(results):
    """Every notebook recorded: tables, a meta file and figures (one written but not recorded)."""
    run, figs = results / "runs", results / "figures"
    write(run, report.BON, "bon_summary", "bon.csv", bon_summary())
    meta = run / "results" / "bon_meta.json"
    meta.write_text(json.dumps({"report": "- the sentences of gold.describe"}))
    manifest.record_result(run, report.BON, "meta", meta)
    write(run, report.RLOO, "rloo_summary", "rloo.csv", rloo_summary())
    write(run, report.NORMS, "erank_shift", "erank.csv",
          pd.DataFrame([{"model": "bt", "split": "hh (ID)", "shift": 1.0}, {"model": "bsr", "split": "hh (ID)", "shift": 0.5}]))
    figs.mkdir()
    for notebook in report.READS:
        path = figs / f"{notebook}_fig.png"
        path.write_bytes(b"png")
        manifest.record_result(run, notebook, report.FIGURE, path)
    (figs / "05_unrecorded.png").write_bytes(b"png")
    return results


def claim_lines(text):
    return {line.split("|")[1].strip(): line.split("|")[3].strip() for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 4 and not line.startswith("| claim")}


def test_claims_follow_the_rules(results):
    text = report.build(results / "runs", results, preset="test")
    lines = claim_lines(text)
    assert lines["BT reaches >= 62% held-out accuracy on HH-RLHF (issue 3 sanity bar)"] == claims.REPRODUCED
    assert lines["under BT, the mean ‖h_c − h_r‖ on training pairs grows over training (BSR Fig 2)"] == claims.REPRODUCED
    assert lines["bsr: grows less than under BT (BSR §4)"] == claims.REPRODUCED
    assert lines["bsr: ‖h‖ spreads less across ID/OOD sets than under BT (BSR §4)"] == claims.NOT_AT_SCALE  # 1% apart
    assert lines["bsr: effective rank shifts less from train to eval than under BT (BSR §4)"] == claims.OPPOSITE
    assert lines["bsr above BT on val2_prompt_ood (BSR Table 5 / GRM Table 1)"] == claims.REPRODUCED
    assert lines["grm above BT on hhh (BSR Table 5 / GRM Table 1)"] == claims.NOT_AT_SCALE
    assert not any("bsr_1e-2" in k for k in lines)  # only the headline variants make claims
    assert f"### 04 · Best-of-N with a synthetic gold\n{claims.NOT_RUN}" in text
    assert "0.8496" in text  # the paper's Table 5 row is shown beside ours
    # the findings table shows every row's verdict by the same rule, whatever column the CSV carried
    assert "| bsr | h_norm_spread_across_splits | 0.101 | 0.1 | not at this scale |" in text
    assert "| bsr | erank_shift_abs_mean | 3.0 | 2.0 | opposite |" in text


def test_z_rule_claims_of_best_of_n_and_rloo(full_results):
    lines = claim_lines(report.build(full_results / "runs", full_results, preset="test"))
    assert lines["BT's gold curve bends down while its proxy keeps rising (GRM Fig 2)"] == claims.REPRODUCED
    assert lines["bsr's best-of-n pick has higher gold than BT's at the largest n (GRM Fig 2)"] == claims.REPRODUCED
    assert lines["grm's best-of-n pick has higher gold than BT's at the largest n (GRM Fig 2)"] == claims.NOT_AT_SCALE
    # 0.2 against 1.96 * hypot(0.06, 0.08) = 0.196
    assert lines["RLOO against BSR gains more gold reward than against BT (BSR §3.3)"] == claims.REPRODUCED
    assert lines["RLOO against BSR gives shorter answers than against BT (BSR Table 4: 1337 vs 2180 chars)"] == claims.REPRODUCED


def test_tables_are_found_by_role_not_by_file_name(results):
    run = results / "runs"
    pd.DataFrame([{"policy": "p", "variant": "bt"}]).to_csv(run / "results" / "04_bon_summary.csv", index=False)
    text = report.build(run, results, preset="test")
    assert f"### 04 · Best-of-N with a synthetic gold\n{claims.NOT_RUN}" in text  # the old name, unrecorded
    (run / "results" / "t5.csv").unlink()  # recorded, then gone
    text = report.build(run, results, preset="test")
    assert f"### 03 · Four over-optimization scenarios\n{claims.NOT_RUN}" in text
    assert "bsr above BT on val2_prompt_ood" not in text
    with pytest.raises(KeyError, match="READS"):
        report.Results(run, results).table(report.BON, "bon_curves")  # a role the report does not declare


def test_figures_come_from_the_manifest(full_results):
    text = report.build(full_results / "runs", full_results, preset="test")
    assert "![05_rloo_fig.png](figures/05_rloo_fig.png)" in text
    assert "05_unrecorded.png" not in text
    beside = report.build(full_results / "runs", full_results / "figures", preset="test")  # results.md
    assert "![01_norm_dispersion_fig.png](01_norm_dispersion_fig.png)" in beside


def test_block_keeps_the_readme_layout(full_results):
    text = report.build(full_results / "runs", full_results, preset="cpu")
    committed = (REPO_ROOT / "README.md").read_text().split(report.START, 1)[1].split(report.END, 1)[0]
    headings = [line for line in committed.splitlines() if line.startswith("#")]
    assert [line for line in text.splitlines() if line.startswith("#")] == headings
    same_path = lambda line: re.sub(r"from `[^`]*/results/`", "from `RUN/results/`", line)  # noqa: E731
    assert same_path(text.splitlines()[0]).startswith(same_path(committed.strip().splitlines()[0]).split(" Verdict rules:")[0])
    assert "\n| claim | ours | verdict |\n|---|---|---|\n" in text
    assert f"{claims.Z_95:g} SEM" in text.splitlines()[0] and f"{claims.REL_TOL:.0%}" in text.splitlines()[0]


def test_main_writes_nothing_without_a_manifest(tmp_path, monkeypatch, capsys):
    run, figs = tmp_path / "runs", tmp_path / "figs"
    monkeypatch.setattr(report, "load_preset", lambda name: {"common": {"run_dir": str(run), "figures_dir": str(figs)}})
    assert report.main(["--preset", "x"]) == 1
    assert "no results manifest" in capsys.readouterr().err and not figs.exists()
    write(run, report.TRAIN, "training", "a.csv", pd.DataFrame([{"run": "bt", "loss": "bt", "regularizer": "none",
                                                                   "eval_accuracy": 0.5}]))
    assert report.main(["--preset", "x"]) == 0
    md = (figs / "results.md").read_text()
    assert md.startswith("# Results\n\nGenerated by") and claims.NOT_AT_SCALE in md


def recorded_in_notebook(stem):
    """(notebook argument, role) of every manifest.record_result call in the notebook's code cells."""
    nb = json.loads((NOTEBOOK_DIR / f"{stem}.ipynb").read_text(encoding="utf-8"))
    calls = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "manifest.record_result":
                calls.add((ast.literal_eval(node.args[1]), ast.literal_eval(node.args[2])))
    return calls


def test_every_role_the_report_reads_is_recorded_by_its_notebook():
    for stem, roles in report.READS.items():
        calls = recorded_in_notebook(stem)
        assert {nb for nb, _ in calls} == {stem}, f"{stem} records under another notebook name: {calls}"
        assert set(roles) <= {role for _, role in calls}, f"{stem} does not record {set(roles) - {r for _, r in calls}}"


def test_every_table_and_figure_a_notebook_writes_is_recorded():
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            src = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
            writes = len(re.findall(r"\b(write_table_atomic|save_figure_atomic|save_meta)\(", src))
            assert src.count("manifest.record_result(") == writes, f"{path.name}: a write is not recorded\n{src}"


def test_readme_block_is_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.START}\nold\n{report.END}\n\n## after\n")
    report.update_readme("new table", readme)
    assert readme.read_text() == f"# title\n\n{report.START}\nnew table\n{report.END}\n\n## after\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        report.update_readme("x", readme)


@pytest.fixture
def zoo_results(results):
    """The issue-19 tables: per-noise BoN summary, fits, mitigation verdicts and regime; RLOO arms;
    01's regime with mitigation verdicts; 03's verdicts with their MDD."""
    run = results / "runs"
    row = dict(policy="pol", n_seeds=2, n_final=96, kl_final=3.58, proxy_norm_final=0.7, gold_norm_final=-0.1,
               n_gold_peak=8)
    write(run, report.BON, "bon_summary", "bon.csv", pd.DataFrame(
        [{**row, "noise": p, "variant": v, "gold_minus_bt": 0.0, "gold_minus_bt_sem": 0.0}
         for p in (0.25, 0.0) for v in ("bt", "bsr")]))
    write(run, report.BON, "regime", "bon_regime.csv", pd.DataFrame([
        {"experiment": "04_bon_curves", "policy": "pol", "noise": 0.25, "reached": True, "test": "drop from the peak",
         "numbers": "gold 0.3 below its peak", "line": "BT over-optimizes here: yes (drop from the peak: gold 0.3 below)"},
        {"experiment": "04_bon_curves", "policy": "pol", "noise": 0.0, "reached": False, "test": "neither",
         "numbers": "flat", "line": "BT over-optimizes here: no (neither: flat)"}]))
    write(run, report.BON, "bon_verdicts", "bon_verdicts.csv", pd.DataFrame([
        {"noise": 0.25, "variant": "bsr", "label": "BSR", "gold_minus_bt": 0.2, "gold_minus_bt_sem": 0.05,
         "rule_verdict": claims.REPRODUCED, "verdict": claims.REPRODUCED},
        {"noise": 0.0, "variant": "bsr", "label": "BSR", "gold_minus_bt": 0.2, "gold_minus_bt_sem": 0.05,
         "rule_verdict": claims.REPRODUCED, "verdict": claims.BT_NO_OVEROPT}]))
    write(run, report.BON, "bon_fits", "fits.csv", pd.DataFrame([
        {"policy": "pol", "noise": 0.25, "rm": None, "variant": "bt", "alpha": 0.5, "beta": 0.2, "kl_star": 1.56}]))
    write(run, report.RLOO, "rloo_summary", "rloo.csv", pd.DataFrame([{"run": "bt_beta0", "kl": 4.2, "gold_delta": 0.0}]))
    write(run, report.RLOO, "regime", "rloo_regime.csv", pd.DataFrame([
        {"experiment": "05_rloo", "run": "bt_beta0", "proxy": "bt", "beta": 0.0, "reached": False, "test": "t",
         "numbers": "slopes", "line": "bt_beta0: BT over-optimizes here: no (t: slopes)"}]))
    write(run, report.RLOO, "rloo_verdicts", "rloo_verdicts.csv", pd.DataFrame([
        {"run": "bsr_beta0", "claim": "RLOO against bsr gains more gold reward than against BT (beta 0; BSR §3.3)",
         "ours": "+0.2 vs BT +0.0", "rule_verdict": claims.REPRODUCED, "verdict": claims.BT_NO_OVEROPT}]))
    write(run, report.NORMS, "findings", "norm_findings.csv", pd.DataFrame([
        {"model": "bt s0 (25%)", "claim": "pair_dist_growth_mean", "value": 1.5, "baseline": 1.5, "rule_verdict": None,
         "verdict": None},
        {"model": "bsr s0 (25%)", "claim": "pair_dist_growth_mean", "value": 1.1, "baseline": 1.5,
         "rule_verdict": claims.REPRODUCED, "verdict": claims.BT_NO_OVEROPT}]))
    write(run, report.NORMS, "regime", "norm_regime.csv", pd.DataFrame([
        {"experiment": "01_norm_dispersion", "model": "bt s0 (25%)", "regime": "spreading", "reached": False, "test": "t",
         "numbers": "pair_dist_mean x1.01", "line": "BT spreads the hidden states: no (t: pair_dist_mean x1.01)"}]))
    write(run, report.SCENARIOS, "verdicts", "v.csv", pd.DataFrame([
        {"variant": "bsr", "measure": "val2_prompt_ood", "difference": 0.01, "noise": 0.05, "verdict": claims.NOT_AT_SCALE,
         "mdd": 0.15, "paper_effect": 0.0152, "detectable": False}]))
    return results


def test_regime_lines_and_mitigation_verdicts_of_the_zoo(zoo_results):
    text = report.build(zoo_results / "runs", zoo_results, preset="test")
    lines = claim_lines(text)
    assert lines["BT over-optimizes in Best-of-N at 25% label noise (Gao et al.; GRM Fig 2)"] == claims.REPRODUCED
    assert lines["BT over-optimizes in Best-of-N at 0% label noise (Gao et al.; GRM Fig 2)"] == claims.NOT_AT_SCALE
    bsr = "BSR: its best-of-n pick keeps more gold than BT's at the largest n, {} label noise (GRM Fig 2; Coste et al.)"
    assert lines[bsr.format("25%")] == claims.REPRODUCED and lines[bsr.format("0%")] == claims.BT_NO_OVEROPT
    assert lines["RLOO against bsr gains more gold reward than against BT (beta 0; BSR §3.3)"] == claims.BT_NO_OVEROPT
    assert lines["bsr s0 (25%): mean ‖h_c − h_r‖ grows less than under BT (BSR §4)"] == claims.BT_NO_OVEROPT
    assert "- BT over-optimizes here: yes (drop from the peak: gold 0.3 below)" in text  # one line per level
    assert "- bt_beta0: BT over-optimizes here: no (t: slopes)" in text and "KL reached: 4.20 nats" in text
    assert "- BT spreads the hidden states: no" in text
    assert claims.REGIME_RULES in text
    mdd = lines["bsr above BT on val2_prompt_ood (BSR Table 5 / GRM Table 1)"]
    assert mdd == claims.NOT_AT_SCALE and "| +0.0100 (noise 0.0500); MDD 0.1500, paper +0.0152 (not detectable here) |" in text
