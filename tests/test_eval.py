"""Evaluation: accuracy tables and intervals, Kendall tau-b vs hand values and a plain loop,
the benchmark registry on rows in the published hub schemas with a stub scorer, and one
real-model pass on the tiny backbone."""

from __future__ import annotations

import itertools
import math

import datasets
import numpy as np
import pandas as pd
import pytest

from rmlib.analysis import benchmarks, stats
from rmlib.data import EXAMPLE_COUNTS, load_hhh_alignment, pair_row, to_dataset


def _tau_reference(x, y):
    """Plain double loop: (concordant - discordant) / sqrt(untied-x pairs * untied-y pairs)."""
    s = nx = ny = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        s += dx * dy
        nx += dx != 0
        ny += dy != 0
    return s / math.sqrt(nx * ny) if nx and ny else math.nan


def _tau_handwritten(x, y, block_elements: int = 4_000_000):
    """rmlib's hand-written tau-b before it used scipy: exact pair count in (block, n) row slabs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan
    s = untied_x = untied_y = 0
    block = max(1, block_elements // n)
    for start in range(0, n, block):
        dx = np.sign(x[start : start + block, None] - x[None, :]).astype(np.int8)  # (b, n)
        dy = np.sign(y[start : start + block, None] - y[None, :]).astype(np.int8)
        s += int((dx.astype(np.int64) * dy).sum())
        untied_x += int(np.count_nonzero(dx))
        untied_y += int(np.count_nonzero(dy))
    if untied_x == 0 or untied_y == 0:
        return math.nan
    return float((s / 2) / math.sqrt((untied_x / 2) * (untied_y / 2)))


def _num(text: str) -> float:
    """Stub reward: the number at the end of a reply ("... 3" -> 3.0)."""
    return float(text.rsplit(" ", 1)[-1])


def stub_scorer(pairs):
    return np.array([_num(t) for t in pairs["chosen"]]), np.array([_num(t) for t in pairs["rejected"]])


# ---- accuracy table ------------------------------------------------------------------------

class TestAccuracyTable:
    def test_values_ties_wrong_and_categories(self):
        # correct: yes, no, tie (wrong), yes, NaN (wrong)
        t = stats.pairwise_accuracy_table([1, 2, 3, 4, np.nan], [0, 3, 3, 1, 0], ["a", "a", "b", "b", "b"], seed=0)
        assert list(t.columns) == ["category", "n", "accuracy", "ci_low", "ci_high"]
        assert t["category"].tolist() == ["a", "b", "overall"] and t["n"].tolist() == [2, 3, 5]
        np.testing.assert_allclose(t["accuracy"], [0.5, 1 / 3, 0.4])
        assert (t["ci_low"] <= t["accuracy"]).all() and (t["accuracy"] <= t["ci_high"]).all()

    def test_overall_only_without_or_with_one_category(self):
        assert stats.pairwise_accuracy_table([1, 0], [0, 1])["category"].tolist() == ["overall"]
        assert stats.pairwise_accuracy_table([1, 0], [0, 1], ["", ""])["category"].tolist() == ["overall"]

    def test_interval_deterministic_and_seeded(self):
        rng = np.random.default_rng(1)
        c, r = rng.normal(size=300) + 0.3, rng.normal(size=300)
        a = stats.pairwise_accuracy_table(c, r, seed=3)
        pd.testing.assert_frame_equal(a, stats.pairwise_accuracy_table(c, r, seed=3))
        assert not a.equals(stats.pairwise_accuracy_table(c, r, seed=4))
        assert stats.pairwise_accuracy_table(c, r, n_boot=0)[["ci_low", "ci_high"]].isna().all().all()

    def test_binomial_draws_match_resampling_pairs(self):
        """The binomial shortcut has the distribution of the mean of resampled pairs."""
        correct = np.r_[np.ones(140), np.zeros(60)]
        rng = np.random.default_rng(0)
        plain = [correct[rng.integers(0, 200, 200)].mean() for _ in range(4000)]
        fast = stats.bootstrap_accuracy(correct, 4000, np.random.default_rng(1))
        np.testing.assert_allclose(stats.percentile_interval(fast), stats.percentile_interval(plain), atol=0.015)

    def test_empty(self):
        t = stats.pairwise_accuracy_table([], [])
        assert t["n"].tolist() == [0] and t[["accuracy", "ci_low", "ci_high"]].isna().all().all()


# ---- Kendall tau-b -------------------------------------------------------------------------

class TestKendall:
    def test_hand_values_with_ties(self):
        # pairs of [1,2,3,4] vs [1,2,2,3]: 5 concordant, 0 discordant, 1 tied in y -> 5/sqrt(6*5)
        assert stats.kendall_tau_b([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(5 / math.sqrt(30))  # scipy: 0.9128709
        # [1,1,2,3] vs [1,2,2,2]: 2 concordant, 0 discordant; 1 pair tied in x, 3 tied in y -> 2/sqrt(5*3)
        assert stats.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 2]) == pytest.approx(2 / math.sqrt(15))
        # [1,1,2,2] vs [1,2,1,2]: 1 concordant, 1 discordant -> 0
        assert stats.kendall_tau_b([1, 1, 2, 2], [1, 2, 1, 2]) == 0.0
        assert stats.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
        assert stats.kendall_tau_b([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)

    def test_undefined_is_nan(self):
        assert math.isnan(stats.kendall_tau_b([1, 2, 3], [1, 1, 1]))
        assert math.isnan(stats.kendall_tau_b([5, 5], [1, 2]))
        assert math.isnan(stats.kendall_tau_b([1], [1]))
        with pytest.raises(ValueError):
            stats.kendall_tau_b([1, 2], [1, 2, 3])

    def test_matches_plain_loop_with_ties(self):
        rng = np.random.default_rng(0)
        for n in (2, 5, 17, 40):
            x, y = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
            ref = _tau_reference(x, y)
            got = stats.kendall_tau_b(x, y)
            assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref)

    def test_large_n_matches_plain_loop(self):
        rng = np.random.default_rng(2)
        x, y = rng.normal(size=300), rng.integers(0, 5, 300).astype(float)
        assert stats.kendall_tau_b(x, y) == pytest.approx(_tau_reference(x, y))

    def test_scipy_matches_the_hand_written_version(self):
        """Same values and the same NaNs (n < 2, constant x or y) as the numpy code it replaced."""
        rng = np.random.default_rng(3)
        cases = [([], []), ([1.0], [2.0]), ([5, 5], [1, 2]), ([1, 2, 3], [1, 1, 1]), ([4, 4, 4], [4, 4, 4])]
        for n in (2, 3, 4, 7, 16, 33, 34, 100):  # scipy's exact p-value path (n <= 33, no ties) and beyond
            cases += [(rng.integers(0, k, n), rng.integers(0, 3, n)) for k in (1, 2, 5)]
            cases += [(rng.normal(size=n), rng.normal(size=n)), (rng.normal(size=n), rng.integers(0, 2, n))]
        for x, y in cases:
            want, got = _tau_handwritten(x, y), stats.kendall_tau_b(x, y)
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-12, abs=1e-15), (x, y)
        x, y = rng.normal(size=500), rng.integers(0, 7, 500)  # several row slabs in the hand-written version
        assert stats.kendall_tau_b(x, y) == pytest.approx(_tau_handwritten(x, y, block_elements=1000), rel=1e-12)
        with pytest.raises(ValueError, match="NaN"):
            stats.kendall_tau_b([1.0, math.nan], [1.0, 2.0])

    def test_per_prompt_taus_nan_where_undefined(self):
        df = pd.DataFrame({
            "p": [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5],
            "score": [0.1, 0.5, 0.9, 3, 2, 1, 1, 2, 7, 7, 1],
            "gold": [-1, 0, 1, -1, 1, 1, 1, 1, -1, 1, 1],
        })
        # p1: tau 1; p2: scores 3>2>1 vs gold -1<1=1 -> (0-2)/sqrt(3*2); p3 gold constant, p4 scores
        # constant, p5 one response: NaN (callers drop and count them)
        taus = stats.per_prompt_taus(df, "p", "score", "gold")
        assert taus.index.tolist() == [1, 2, 3, 4, 5] and taus.name == "kendall_tau_b"
        assert taus.isna().tolist() == [False, False, True, True, True]
        assert taus.dropna().tolist() == pytest.approx([1, -2 / math.sqrt(6)])
        one = stats.per_prompt_taus(df[df.p == 5], "p", "score", "gold")
        assert one.index.tolist() == [5] and one.isna().all()


# ---- benchmarks on the published hub schemas, stub scorer -----------------------------------
# ---- benchmarks on the published hub schemas, stub scorer -----------------------------------

def _conv(q1, a1, q2, a2):
    return [{"content": q1, "role": "user"}, {"content": a1, "role": "assistant"},
            {"content": q2, "role": "user"}, {"content": a2, "role": "assistant"}]


def _mt(qid, winner, a1, b1, turn=1, a2="second a 0", b2="second b 0"):
    # lmsys/mt_bench_human_judgments, split "human": these 8 columns
    return dict(question_id=qid, model_a="gpt-4", model_b="vicuna-13b-v1.2", winner=winner, judge="expert_0",
                conversation_a=_conv("Q1", a1, "Q2", a2), conversation_b=_conv("Q1", b1, "Q2", b2), turn=turn)


MT_ROWS = [
    _mt(81, "model_a", "good 5", "bad 1"),           # RM agrees
    _mt(81, "model_b", "good 5", "bad 1"),           # RM disagrees
    _mt(101, "model_b", "meh 2", "fine 4"),          # agrees
    _mt(101, "model_a", "one 3", "two 3"),           # RM tie -> wrong
    _mt(81, "tie", "x 9", "y 1"),                    # tie: dropped (GRM's code would count it as a win for b)
    _mt(101, "tie", "x 1", "y 9"),                   # tie: dropped
    _mt(81, "model_a", "a1 1", "b1 2", turn=2, a2="a2 9", b2="b2 1"),  # turn-2 history differs: dropped by loader
]


class TestBenchmarks:
    def test_registry(self):
        assert set(benchmarks.BENCHMARKS) == {"hh_harmless", "hhh", "lfqa", "mt_bench", "reward_bench"}
        assert {n for n, b in benchmarks.BENCHMARKS.items() if b.hub_only} == {"mt_bench", "reward_bench"}
        with pytest.raises(ValueError, match="unknown benchmark"):
            benchmarks.evaluate_benchmarks(None, None, ["nope"], scorer=stub_scorer)

    def test_mt_bench_ties_dropped(self):
        t = benchmarks.evaluate_benchmarks(None, None, ["mt_bench"], scorer=stub_scorer, n_boot=200,
                                  sources={"mt_bench": datasets.Dataset.from_list(MT_ROWS)})
        assert list(t.columns) == benchmarks.BENCHMARK_COLUMNS
        overall = t[t.category == "overall"].iloc[0]
        assert overall["n"] == 4 and overall["accuracy"] == pytest.approx(2 / 4)
        # categories from the local MT-Bench question file: 81 = writing, 101 = reasoning
        by_cat = t.set_index("category")["accuracy"]
        assert by_cat["writing"] == pytest.approx(0.5) and by_cat["reasoning"] == pytest.approx(0.5)

    def test_mt_bench_note_states_how_the_official_code_differs(self):
        # GRM rm_eval/load_eval_datasets.py: human + gpt4_pair splits; winner != 'model_a' -> conversation_b chosen
        note = benchmarks.BENCHMARKS["mt_bench"].description
        assert "human split only" in note and "TIES DROPPED" in note
        assert "gpt4_pair" in note and "model_b win" in note and "as wins" not in note

    def test_reward_bench_subsets_sections_and_score(self):
        def row(subset, c, r, i):  # allenai/reward-bench, split "filtered": these 7 columns
            return dict(prompt=f"prompt {i}", chosen=f"chosen {c}", rejected=f"rejected {r}", chosen_model="m1",
                        rejected_model="m2", subset=subset, id=i)

        rows = [row("alpacaeval-easy", 2, 1, 0), row("alpacaeval-easy", 1, 2, 1), row("mt-bench-easy", 3, 1, 2),
                row("hep-go", 2, 1, 3), row("hep-go", 2, 1, 4), row("math-prm", 1, 1, 5),
                row("donotanswer", 5, 0, 6), row("new-subset", 0, 1, 7)]
        t = benchmarks.evaluate_benchmarks(None, None, ["reward_bench"], scorer=stub_scorer, n_boot=300,
                                  sources={"reward_bench": rows})
        acc = t.set_index("category")["accuracy"]
        assert acc["alpacaeval-easy"] == 0.5 and acc["mt-bench-easy"] == 1 and acc["hep-go"] == 1
        assert acc["math-prm"] == 0 and acc["new-subset"] == 0  # tie counts as wrong
        w = EXAMPLE_COUNTS
        chat = (0.5 * w["alpacaeval-easy"] + 1 * w["mt-bench-easy"]) / (w["alpacaeval-easy"] + w["mt-bench-easy"])
        reasoning = w["hep-go"] / (w["hep-go"] + w["math-prm"])
        assert acc["Chat"] == pytest.approx(chat) and acc["Reasoning"] == pytest.approx(reasoning)
        assert acc["Safety"] == 1 and "Chat Hard" not in acc
        assert acc["overall"] == pytest.approx((chat + reasoning + 1) / 3)
        n = t.set_index("category")["n"]
        assert n["Chat"] == 3 and n["overall"] == 7  # new-subset is in no section
        sec = t[t.category.isin(["Chat", "Reasoning", "Safety", "overall"])]
        assert (sec.ci_low <= sec.accuracy + 1e-12).all() and (sec.accuracy <= sec.ci_high + 1e-12).all()

    def test_unavailable_hub_data_is_skipped_not_a_crash(self, monkeypatch):
        def offline(*a, **kw):
            raise ConnectionError("no network")

        monkeypatch.setattr(datasets, "load_dataset", offline)
        t = benchmarks.evaluate_benchmarks(None, None, ["mt_bench", "reward_bench", "lfqa"], scorer=stub_scorer_lengths,
                                  n_boot=50)
        skipped = t[t.category == "skipped"]
        assert skipped["benchmark"].tolist() == ["mt_bench", "reward_bench"] and (skipped.n == 0).all()
        assert skipped["note"].str.contains("lmsys/mt_bench_human_judgments").any()
        assert t[(t.benchmark == "lfqa") & (t.category == "overall")]["n"].item() > 200

    def test_max_pairs_is_a_deterministic_stratified_subsample(self):
        a, sa = benchmarks.evaluate_benchmarks(None, None, ["hhh"], max_pairs=40, seed=1, scorer=stub_scorer_lengths,
                                      n_boot=50, return_scores=True)
        b, sb = benchmarks.evaluate_benchmarks(None, None, ["hhh"], max_pairs=40, seed=1, scorer=stub_scorer_lengths,
                                      n_boot=50, return_scores=True)
        c, sc = benchmarks.evaluate_benchmarks(None, None, ["hhh"], max_pairs=40, seed=2, scorer=stub_scorer_lengths,
                                      n_boot=50, return_scores=True)
        pd.testing.assert_frame_equal(a, b)
        assert sa["id"].tolist() == sb["id"].tolist() != sc["id"].tolist()
        counts = a.set_index("category")["n"]
        assert counts["overall"] == 40 and set(counts.drop("overall")) <= {10, 11, 9, 8, 12}
        assert a["note"].str.startswith("subsample of 40").all()


def stub_scorer_lengths(pairs):
    """Stub: longer reply = higher reward."""
    return (np.array([len(t) for t in pairs["chosen"]], float), np.array([len(t) for t in pairs["rejected"]], float))


# ---- a real (tiny) model -------------------------------------------------------------------

def test_evaluate_pairs_on_the_tiny_model(tokenizer, tiny_backbone):
    from rmlib.model.encoding import encode_pairs
    from rmlib.model.reward_model import ModelSpec, build_reward_model
    from rmlib.model.scoring import score_pairs

    model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
    pairs = benchmarks.subsample_pairs(load_hhh_alignment().dataset, 12, seed=0)
    scores, table = benchmarks.evaluate_pairs(model, tokenizer, pairs, "hhh", max_length=64, batch_size=4, bf16=False,
                                     n_boot=100, progress=False)
    assert len(scores) == 12 and np.isfinite(scores[["reward_chosen", "reward_rejected"]].to_numpy()).all()
    assert table["benchmark"].eq("hhh").all() and table["category"].iloc[-1] == "overall"
    assert table["accuracy"].iloc[-1] == pytest.approx(scores["correct"].mean())
    # same numbers as the plain scorer, in input order
    enc, _ = encode_pairs(pairs, tokenizer, 64)
    ref = score_pairs(model, enc, batch_size=3, bf16=False, progress=False)
    np.testing.assert_allclose(scores["reward_chosen"], ref["chosen"], rtol=1e-4, atol=1e-5)


def test_identical_after_truncation_counts_as_wrong(tokenizer, tiny_backbone):
    from rmlib.model.reward_model import ModelSpec, build_reward_model

    model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
    long_same = "word " * 200
    pairs = to_dataset([
        pair_row(id="a", prompt=[{"role": "user", "content": "q"}], chosen="yes", rejected="no", source="t"),
        pair_row(id="b", prompt=[{"role": "user", "content": "q"}], chosen=long_same + "A", rejected=long_same + "B",
                 source="t"),
    ])
    scores, table = benchmarks.evaluate_pairs(model, tokenizer, pairs, "t", max_length=48, bf16=False, n_boot=0,
                                     progress=False)
    assert scores["id"].tolist() == ["a", "b"] and np.isnan(scores.loc[1, "reward_chosen"])
    assert not scores.loc[1, "correct"] and table["n"].iloc[-1] == 2
