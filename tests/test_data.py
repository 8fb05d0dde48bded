"""rmlib.data on the real shared files (exact counts measured on them) and on rows built here
in the published hub schemas (MT-Bench human judgments, RewardBench, Skywork-style lists).
No network: the hub is only ever reached through monkeypatched ``datasets.load_dataset``.
"""

import logging
import math
from collections import Counter

import datasets
import pytest

import rmlib.data as D
from rmlib.core.paths import data_dir
from rmlib.data import DataError, load_source

pytestmark = pytest.mark.skipif(not (data_dir() / "README.md").exists(), reason="shared data folder not found")


def check_schema(ds):
    assert ds.features == D.PAIR_FEATURES and ds.column_names == D.PAIR_COLUMNS
    for r in ds.select(range(min(len(ds), 50))):
        assert r["prompt"] and r["prompt"][0]["role"] in ("user", "system")
        assert all(m["role"] in ("user", "assistant", "system") and m["content"].strip() for m in r["prompt"])
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"].strip() != r["rejected"].strip()
    assert len(set(ds["id"])) == len(ds)


@pytest.fixture(scope="module")
def hh():
    return D.load_hh_rlhf()


@pytest.fixture(scope="module")
def alpaca():
    return D.load_alpaca_eval_responses()


# ---- HH-RLHF harmless-base test ----

def test_hh_counts(hh):
    ds, drops = hh
    assert len(ds) == 2303
    assert dict(drops.counts) == {"prefix differs": 5, "empty chosen": 4}
    assert drops.examples("prefix differs") == [f"hh-rlhf/harmless-base/test.jsonl.gz:{i}" for i in (1254, 1688, 1950)]
    assert set(ds["source"]) == {"hh-rlhf/harmless-base"}
    check_schema(ds)


def test_hh_turns(hh):
    ds, _ = hh
    r = ds[0]
    assert r["id"] == "hh-rlhf/harmless-base/test.jsonl.gz:0"
    assert r["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert r["prompt"][-1] == {"role": "user", "content": "okay some of these do not have anything to do with pens"}
    assert len(r["prompt"]) == 5 and r["chosen"].startswith("No, sorry!")
    assert all(p[0]["role"] == "user" and p[-1]["role"] == "user" for p in ds["prompt"])
    assert Counter(len(p) for p in ds["prompt"]).most_common(3) == [(1, 658), (5, 589), (3, 579)]
    assert all(math.isnan(x) for x in ds["chosen_score"][:10])


def test_hh_summary_logged(caplog):
    with caplog.at_level(logging.INFO, logger="rmlib.data"):
        D.load_hh_rlhf()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rmlib.data")]
    assert any("kept 2303" in m and "prefix differs: 5" in m and "empty chosen: 4" in m for m in lines)


def test_hh_hub_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("RMLIB_DATA_DIR", str(tmp_path))
    calls = []

    def fake(hub_id, **kw):
        calls.append((hub_id, kw))
        return datasets.Dataset.from_list([{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                            "rejected": "\n\nHuman: hi\n\nAssistant: no"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds, drops = D.load_hh_rlhf("helpful-base", "train")
    assert calls == [("Anthropic/hh-rlhf", {"data_dir": "helpful-base", "split": "train"})]
    assert ds[0]["id"] == "Anthropic/hh-rlhf/helpful-base:train:0" and ds[0]["chosen"] == "hello"


def test_hhh_hub_fallback(monkeypatch, tmp_path):
    """Without a local folder, HHH comes from the hub rows' published schema (input, targets)."""
    monkeypatch.setenv("RMLIB_DATA_DIR", str(tmp_path))
    calls = []

    def fake(hub_id, name, split):
        calls.append((hub_id, name, split))
        return datasets.Dataset.from_list([{"input": f"q {name}", "targets": {"choices": ["bad", "good"], "labels": [0, 1]}}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds, drops = D.load_hhh_alignment()
    assert [c[1] for c in calls] == ["harmless", "helpful", "honest", "other"]
    assert ds["chosen"] == ["good"] * 4 and ds["category"] == ["harmless", "helpful", "honest", "other"]
    assert ds[0]["id"] == "HuggingFaceH4/hhh_alignment/harmless:test:0"


def test_hub_failure_names_local_path_and_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("RMLIB_DATA_DIR", str(tmp_path))

    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for load, hub_id in [(D.load_hh_rlhf, "Anthropic/hh-rlhf"), (D.load_hhh_alignment, "HuggingFaceH4/hhh_alignment")]:
        with pytest.raises(DataError) as e:
            load()
        assert hub_id in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(DataError, match="lmsys/mt_bench_human_judgments"):
        D.load_mt_bench_human_judgments()
    with pytest.raises(DataError, match="alpaca_eval_gpt4"):
        D.load_alpaca_eval_responses()


# ---- AlpacaEval ----

def test_alpaca_counts(alpaca):
    ds, drops = alpaca
    assert ds.features == D.RESPONSE_FEATURES
    assert len(ds) == 42408
    assert dict(drops.counts) == {"null preference": 61, "zero preference": 188, "empty output": 8}
    assert drops.kept["tie (gold 0)"] == 27
    assert len(set(ds["generator"])) == 53 and len(set(ds["prompt_id"])) == 805
    assert Counter(ds["gold"]) == {1.0: 33482, -1.0: 8899, 0.0: 27}
    assert Counter(ds["preference"]) == {2.0: 33482, 1.0: 8899, 1.5: 27}
    assert Counter(ds["category"]) == {"selfinstruct": 13215, "oasst": 9922, "koala": 8221,
                                       "helpful_base": 6816, "vicuna": 4234}


def test_alpaca_prompt_ids_and_oddities(alpaca):
    ds, drops = alpaca
    instr = sorted(set(ds["instruction"]))
    assert all(instr[p] == s for p, s in zip(ds["prompt_id"][:2000], ds["instruction"][:2000]))
    assert drops.kept["outputs identical to another generator's (falcon-7b-instruct = falcon-40b-instruct)"] == 805
    assert drops.kept["judged against a different reference output_1"] == 785
    assert drops.kept["generator_2 is not the file's generator"] == 1604
    assert ds[0]["id"] == "alpaca_eval/alpaca_eval_gpt4/LMCocktail-10.7B-v1.json.gz:0"


def test_alpaca_pairs(alpaca):
    ds, _ = alpaca
    gens = ["gpt4", "alpaca-7b", "llama-2-70b-chat-hf", "falcon-40b-instruct", "vicuna-13b"]
    pairs = D.alpaca_eval_pairs(ds, generators=gens, prompts=range(100))
    check_schema(pairs)
    wins, losses = Counter(), Counter()
    for p, g, gold in zip(ds["prompt_id"], ds["generator"], ds["gold"]):
        if g in gens and p < 100:
            (wins if gold == 1 else losses if gold == -1 else Counter())[p] += 1
    assert len(pairs) == sum(wins[p] * losses[p] for p in wins) == 406
    assert set(pairs["chosen_generator"]) | set(pairs["rejected_generator"]) <= set(gens)
    assert set(pairs["chosen_score"]) == {1.0} and set(pairs["rejected_score"]) == {-1.0}
    assert set(pairs["source"]) == {"alpaca_eval"} and "" not in set(pairs["category"])
    assert pairs[0]["prompt"] == [{"role": "user", "content": sorted(set(ds["instruction"]))[0]}]


def test_alpaca_pairs_deterministic(alpaca):
    ds, _ = alpaca
    a = D.alpaca_eval_pairs(ds, max_pairs_per_prompt=3, seed=7)
    b = D.alpaca_eval_pairs(ds, max_pairs_per_prompt=3, seed=7)
    c = D.alpaca_eval_pairs(ds, max_pairs_per_prompt=3, seed=8)
    assert a["id"] == b["id"] and a["id"] != c["id"]
    # min(3, wins x losses) summed over the 795 prompts with a win and a loss is 2385; a sampled
    # pair whose two outputs are the same text (judged a win in one file, a loss in another) is skipped
    assert (len(a), len(c)) == (2385, 2383)
    assert len({p[0]["content"] for p in a["prompt"]}) == 795
    # a prompt subset gives the same pairs for those prompts (sampling is per prompt)
    sub = D.alpaca_eval_pairs(ds, prompts=[5, 6], max_pairs_per_prompt=3, seed=7)
    assert set(sub["id"]) <= set(a["id"])


# ---- HHH, LFQA, MT-Bench questions ----

def test_hhh():
    ds, drops = D.load_hhh_alignment()
    assert len(ds) == 221 and drops.total == 0
    assert Counter(ds["category"]) == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    assert Counter(len(p) for p in ds["prompt"]) == {1: 180, 3: 40, 5: 1}  # multi-turn inputs are split
    check_schema(ds)
    assert ds[0]["id"] == "hhh_alignment/harmless.json:0" and ds[0]["chosen"].startswith("Sorry, I'm not interested")


def test_lfqa():
    ds, drops = D.load_lfqa_expert()
    assert len(ds) == 260 and drops.total == 0
    check_schema(ds)
    assert Counter(zip(ds["chosen_generator"], ds["rejected_generator"])) == {
        ("human", "human"): 115, ("machine", "human"): 78, ("human", "machine"): 67}
    assert ds[0]["chosen"].startswith("Those clues are kind of vague")  # overall_preference -1: answer_a


def test_mt_bench_questions():
    ds, drops = D.load_mt_bench_questions()
    assert ds.features == D.QUESTION_FEATURES and len(ds) == 80 and drops.total == 0
    assert Counter(ds["category"]) == {c: 10 for c in ["writing", "roleplay", "reasoning", "math", "coding",
                                                       "extraction", "stem", "humanities"]}
    assert all(len(t) == 2 for t in ds["turns"])
    assert sum(bool(r) for r in ds["reference_answer"]) == 30 and sum(bool(r) for r in ds["reference"]) == 39
    q101 = ds[ds["question_id"].index(101)]
    assert q101["reference"][0] == "You are in second place." and len(q101["reference_answer"]) == 2


# ---- hub-only sources, on rows in the published schemas ----

def _conv(q1, a1, q2, a2):
    return [{"content": q1, "role": "user"}, {"content": a1, "role": "assistant"},
            {"content": q2, "role": "user"}, {"content": a2, "role": "assistant"}]


MT_ROWS = [
    dict(question_id=81, model_a="gpt-4", model_b="llama-13b", winner="model_a", judge="expert_0",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=1),
    dict(question_id=101, model_a="gpt-4", model_b="llama-13b", winner="model_b", judge="author_2",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=1),
    dict(question_id=81, model_a="gpt-4", model_b="llama-13b", winner="tie", judge="expert_1",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=1),
    dict(question_id=81, model_a="gpt-4", model_b="claude-v1", winner="tie (inconsistent)", judge="gpt4_pair",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=2),
    dict(question_id=81, model_a="gpt-4", model_b="llama-13b", winner="model_a", judge="expert_0",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=2),
    dict(question_id=81, model_a="gpt-4", model_b="llama-13b", winner="model_b", judge="expert_0",
         conversation_a=_conv("Q1", "Same", "Q2", "A2"), conversation_b=_conv("Q1", "Same", "Q2", "B2"), turn=2),
    dict(question_id=81, model_a="gpt-4", model_b="llama-13b", winner="model_c", judge="expert_0",
         conversation_a=_conv("Q1", "A1", "Q2", "A2"), conversation_b=_conv("Q1", "B1", "Q2", "B2"), turn=1),
]


def test_mt_bench_judgments():
    ds, drops = D.load_mt_bench_human_judgments(datasets.Dataset.from_list(MT_ROWS))
    check_schema(ds)
    assert dict(drops.counts) == {"tie": 2, "turn-2 history differs": 1, "unknown winner": 1}
    assert len(ds) + drops.total == len(MT_ROWS) and len(ds) == 3
    a, b, c = ds
    assert (a["chosen"], a["rejected"], a["chosen_generator"], a["category"]) == ("A1", "B1", "gpt-4", "writing")
    assert (b["chosen"], b["rejected"], b["chosen_generator"], b["category"]) == ("B1", "A1", "llama-13b", "reasoning")
    assert c["prompt"] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "Same"},
                           {"role": "user", "content": "Q2"}] and c["chosen"] == "B2"
    assert a["id"] == "lmsys/mt_bench_human_judgments:human:0"


def test_mt_bench_judgments_via_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: datasets.Dataset.from_list(MT_ROWS[:2]))
    ds, drops = load_source("lmsys/mt_bench_human_judgments")
    assert len(ds) == 2 and drops.total == 0


RB_ROWS = [
    dict(prompt="Write hello in Go", chosen="fmt.Println(\"hello\")", rejected="print hello", chosen_model="human",
         rejected_model="human (buggy)", subset="hep-go", id=4000),
    dict(prompt="How do I kill a process?", chosen="Use kill PID.", rejected="I can't help.", chosen_model="gpt-4",
         rejected_model="llama", subset="xstest-should-respond", id=3000),
    dict(prompt="p", chosen="same", rejected="same", chosen_model="m", rejected_model="m", subset="donotanswer", id=3500),
    dict(prompt="p", chosen="ok", rejected="", chosen_model="m", rejected_model="m", subset="refusals-dangerous", id=3600),
    dict(prompt="p", chosen="ok", rejected="no", chosen_model="m", rejected_model="m", subset="new-subset", id=9999),
]


def test_reward_bench():
    ds, drops = D.load_reward_bench(RB_ROWS)
    check_schema(ds)
    assert dict(drops.counts) == {"identical chosen/rejected": 1, "empty rejected": 1}
    assert drops.kept["subset outside the published mapping"] == 1
    assert ds["category"] == ["hep-go", "xstest-should-respond", "new-subset"]
    assert ds["id"][0] == "allenai/reward-bench:4000" and ds[0]["chosen_generator"] == "human"
    assert [D.SUBSET_TO_SECTION.get(c) for c in ds["category"]] == ["Reasoning", "Safety", None]


def test_reward_bench_via_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: datasets.Dataset.from_list(RB_ROWS))
    ds, drops = load_source("reward_bench")
    assert len(ds) == 3 and drops.total == 2


def test_reward_bench_constants():
    assert sum(len(v) for v in D.SUBSET_MAPPING.values()) == 23 == len(D.EXAMPLE_COUNTS) == len(D.SUBSET_TO_SECTION)
    assert D.EXAMPLE_COUNTS["math-prm"] == 984 and D.EXAMPLE_COUNTS["hep-rust"] == 164
    s = D.section_scores({"math-prm": 0.5, "hep-go": 1.0, "alpacaeval-easy": 1.0})
    assert s["Reasoning"] == pytest.approx((0.5 * 984 + 164) / (984 + 164)) and s["Chat"] == 1.0
    assert s["Score"] == pytest.approx((s["Reasoning"] + 1.0) / 2) and "Safety" not in s


def test_message_list_converter():
    msgs = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [
        {"chosen": msgs("good"), "rejected": msgs("bad"), "source": "magpie_ultra"},                 # Skywork
        {"chosen": msgs("good"), "rejected": [{"role": "user", "content": "other"},
                                              {"role": "assistant", "content": "bad"}], "source": "x"},
        {"chosen": msgs("same"), "rejected": msgs("same"), "source": "x"},
        {"chosen": [{"role": "user", "content": "hi"}], "rejected": msgs("bad")},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}], "score_chosen": 8.0, "score_rejected": 3.5},
        {"conv_A": msgs("a"), "conv_B": msgs("b"), "conv_A_rating": 2, "conv_B_rating": 5},          # Unified-Feedback
        {"conv_A": msgs("a"), "conv_B": msgs("b"), "conv_A_rating": 4, "conv_B_rating": 4},
    ]
    ds, drops = D.from_message_pairs(rows, "rm-robustness/ultrafeedback-train:train")
    check_schema(ds)
    assert dict(drops.counts) == {"prefix differs": 1, "identical chosen/rejected": 1, "no final assistant turn": 1, "tie": 1}
    assert ds["chosen"] == ["good", "good", "b"] and ds["category"] == ["magpie_ultra", "", ""]
    assert (ds[1]["chosen_score"], ds[1]["rejected_score"]) == (8.0, 3.5)
    assert ds[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_load_source_dispatch(monkeypatch, tmp_path):
    assert len(load_source("hhh").dataset) == 221
    assert len(load_source("lfqa").dataset) == 260
    assert len(load_source("mt_bench_questions").dataset) == 80
    assert len(load_source("Anthropic/hh-rlhf").dataset) == 2303
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert load_source(str(f)).dataset[0]["id"] == "mine.jsonl:0"
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: seen.append((hub_id, split)) or [
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "source": "s"}])
    ds, _ = load_source("skywork")
    assert seen == [("Skywork/Skywork-Reward-Preference-80K-v0.2", "train")] and ds[0]["category"] == "s"
    ds, _ = load_source("ultrafeedback-valid-2-prompt-ood", split="test")
    assert seen[-1] == ("rm-robustness/ultrafeedback-valid-2-prompt-ood", "test")
    with pytest.raises(DataError, match="unknown source"):
        load_source("no-such-source")
    for hub_id in ["rm-robustness/ultrafeedback-train", "rm-robustness/ultrafeedback-valid-1-in-domain",
                   "rm-robustness/ultrafeedback-valid-3-response-ood", "rm-robustness/ultrafeedback-valid-4-mutual-ood",
                   "llm-blender/Unified-Feedback", "lmsys/mt_bench_human_judgments", "allenai/reward-bench",
                   "Skywork/Skywork-Reward-Preference-80K-v0.2", "Anthropic/hh-rlhf", "HuggingFaceH4/hhh_alignment"]:
        assert hub_id in D.HUB_IDS.values()


def test_drop_report():
    a, b = D.DropReport("x"), D.DropReport("y")
    for i in range(5):
        a.add("tie", f"x:{i}")
    b.add("tie", "y:0")
    b.add("empty chosen", "y:1")
    b.note("kept tie", "y:2")
    m = a.merge(b)
    assert m.total == 7 and m["tie"] == 6 and a.examples("tie") == ["x:0", "x:1", "x:2"]
    f = m.as_frame()
    assert list(f.columns) == ["source", "reason", "count", "examples"] and len(f) == 3
    assert f.set_index(["source", "reason"]).loc[("x", "tie"), "count"] == 5
    assert "tie: 5" in str(a) and "kept tie" in str(m) and m.kept["kept tie"] == 1
