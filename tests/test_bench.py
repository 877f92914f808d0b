"""The benchmark harness: question loading, method validation, and one small real run on SmolLM2."""
from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from drafthorse.actors.models.loader import load, smollm2_path
from drafthorse.cluster.tools.bench import METHODS, format_table, load_questions, resolve_methods, run_bench


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write one sentence about the sea.", "Again."]},
    {"question_id": 2, "category": "writing", "turns": ["Write one sentence about a horse."]},
    {"question_id": 3, "category": "math", "turns": ["What is 2 + 3? Answer with the number."]},
    {"question_id": 4, "category": "writing", "turns": ["Write one sentence about rain."]},
    {"question_id": 5, "category": "math", "turns": ["What is 7 * 6?"]},
]


# ---------------------------------------------------------------- load_questions

def test_load_questions_per_category_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    assert [q["question_id"] for q in load_questions(path, 1)] == [1, 3]
    assert [q["question_id"] for q in load_questions(path, 2)] == [1, 2, 3, 5]
    assert [q["question_id"] for q in load_questions(str(path), None)] == [1, 2, 3, 4, 5]


def test_load_questions_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="nope.jsonl.*no such file"):
        load_questions(missing, 1)


def test_load_questions_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_questions(path, None)


@pytest.mark.parametrize("row, message", [
    ({"category": "x", "turns": ["a"]}, "missing field 'question_id'"),
    ({"question_id": 1, "turns": ["a"]}, "missing field 'category'"),
    ({"question_id": 1, "category": "x", "turns": []}, "'turns' must be a non-empty list"),
    ({"question_id": 1, "category": "x", "turns": "a"}, "'turns' must be a non-empty list"),
    ([1, 2], "expected a JSON object"),
])
def test_load_questions_bad_fields(tmp_path, row, message):
    path = write_jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], row])
    with pytest.raises(ValueError, match=rf"q\.jsonl:2: {message}"):
        load_questions(path, None)


def test_load_questions_bad_per_category_and_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    with pytest.raises(ValueError, match="per_category"):
        load_questions(path, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no questions"):
        load_questions(empty, None)


# ---------------------------------------------------------------- methods

def test_resolve_methods_adds_ar_first_and_dedupes():
    methods, notes = resolve_methods(["ngram", "hf", "ngram"])
    assert methods == ["ar", "ngram", "hf"]
    assert len(notes) == 1 and "ar" in notes[0]
    methods, notes = resolve_methods(["hf-pld", "ar"])
    assert methods == ["ar", "hf-pld"] and notes == []


def test_unknown_method_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError) as e:
        run_bench(QUESTIONS[:1], ["ar", "lookahead"], 8, tmp_path, lm=None)
    assert "'lookahead'" in str(e.value)
    assert all(m in str(e.value) for m in METHODS)


def test_tree_budget_suffix_only_on_engine_methods():
    methods, _ = resolve_methods(["eagle/8", "eagle/16", "ngram/4", "eagle"])
    assert methods == ["ar", "eagle/8", "eagle/16", "ngram/4", "eagle"]
    for bad in ("eagle/x", "eagle/0", "hf/8", "cluster-ngram/4", "nope/4"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            resolve_methods([bad])


def test_draft_model_needs_a_draft_model(tmp_path):
    with pytest.raises(ValueError, match="draft model"):
        run_bench(QUESTIONS[:1], ["ar", "draft-model"], 8, tmp_path, lm=None)


# ---------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def smollm2():
    return load(spec="smollm2", dtype="float32")


@pytest.mark.smollm2
def test_run_bench_on_smollm2(smollm2, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    questions = load_questions(path, 1)                       # ids 1 (writing) and 3 (math)
    out = tmp_path / "out" / "run"                            # created by run_bench
    results = run_bench(questions, ["ar", "ngram", "hf"], 8, out, smollm2, progress=False)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["methods"] == ["ar", "ngram", "hf"]
    assert results["categories"] == ["writing", "math"]
    env = results["env"]
    assert env["question_ids"] == [1, 3] and env["max_new_tokens"] == 8 and env["dtype"] == "float32"
    assert env["model"] == "smollm2" and env["threads"] >= 1 and env["torch"] and env["date"]
    assert env["memory_read_gb_per_s"] > 0 and isinstance(env["cpu_flags"], list)
    for m in ("ar", "hf"):   # weights read per second: float32 SmolLM2 reads ~0.538 GB a forward, ours and HF's
        s = results["summary"][m]["overall"]
        assert s["weight_gb_per_s"] == pytest.approx(0.538 * s["tokens"] / s["seconds"], rel=0.05)

    summary = results["summary"]
    for m in results["methods"]:
        assert set(summary[m]) == {"writing", "math", "overall"}
        for group, s in summary[m].items():
            assert s["prompts"] == (2 if group == "overall" else 1)
            assert 0 < s["tokens"] <= 8 * s["prompts"] and s["seconds"] > 0 and s["tokens_per_s"] > 0
            assert s["speedup"] > 0
        assert summary[m]["overall"]["tokens"] == sum(summary[m][c]["tokens"] for c in ("writing", "math"))
    for group in ("writing", "math", "overall"):
        assert summary["ar"][group]["speedup"] == 1.0
        assert summary["ar"][group]["mean_accepted"] == 1.0   # one token per target forward
        assert summary["ngram"][group]["mean_accepted"] >= 1.0
        assert summary["hf"][group]["mean_accepted"] is None
    assert summary["ngram"]["overall"]["draft_per_verify"] == pytest.approx(
        summary["ngram"]["overall"]["time_split"]["draft_s"] / summary["ngram"]["overall"]["time_split"]["verify_s"],
        abs=1e-3)
    assert summary["hf"]["overall"]["draft_per_verify"] is None
    # greedy speculation is lossless: every ngram output equals ar's token for token
    assert summary["ngram"]["overall"]["equal_to_ar"] == {"equal": 2, "total": 2}
    assert summary["ar"]["overall"]["equal_to_ar"] == {"equal": 2, "total": 2}

    # interleaved, rotated order per question
    orders = [r["order"] for r in results["questions"]]
    assert orders == [["ar", "ngram", "hf"], ["ngram", "hf", "ar"]]

    png = (out / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    table = format_table(results)
    for word in ("ar", "ngram", "hf", "writing", "math", "overall"):
        assert word in table
    assert "2/2" in table


@pytest.mark.smollm2
def test_run_bench_draft_model_self_draft(smollm2, tmp_path):
    """The target drafting for itself: every draft is accepted, output still equals ar's."""
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    results = run_bench(load_questions(path, None), ["draft-model"], 8, tmp_path, smollm2,
                        draft_lm=smollm2, progress=False, draft_depth=3)
    assert results["methods"] == ["ar", "draft-model"]
    assert any("added 'ar'" in n for n in results["notes"])
    s = results["summary"]["draft-model"]["overall"]
    assert s["equal_to_ar"] == {"equal": 1, "total": 1}
    assert s["mean_accepted"] > 2.0
    assert results["env"]["draft_model"] == "smollm2" and results["env"]["draft_depth"] == 3
    assert (tmp_path / "speedup.png").exists()


def test_llama_cpp_method_needs_its_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ValueError, match=r"llama-cpp-python: pip install 'drafthorse\[llama-cpp\]'"):
        resolve_methods(["ar", "llama-cpp"])


@pytest.mark.smollm2
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_run_bench_llama_cpp_and_quantised(tmp_path, dtype):
    """llama.cpp's plain decoding of the same GGUF beside ours at int8 and int4 (skipped without the
    optional extra): it runs on our prompt ids, and its greedy tokens mostly agree with ours (different
    number formats: only the first tokens are compared)."""
    pytest.importorskip("llama_cpp")
    lm = load(spec="smollm2", dtype=dtype)
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    results = run_bench(load_questions(path, None), ["ngram", "llama-cpp"], 16, tmp_path, lm, progress=False)
    assert results["env"]["dtype"] == dtype and results["env"]["llama_cpp_python"]
    s = results["summary"]
    assert s["ngram"]["overall"]["equal_to_ar"] == {"equal": 1, "total": 1}
    assert s["llama-cpp"]["overall"]["tokens"] == 16 and s["llama-cpp"]["overall"]["tokens_per_s"] > 0
    gguf_bytes = sum(int(t.n_bytes) for t in GGUFReader(smollm2_path()).tensors)
    cpp = s["llama-cpp"]["overall"]
    assert cpp["weight_gb_per_s"] == pytest.approx(gguf_bytes * 16 / cpp["seconds"] / 1e9, rel=0.01)
    first = results["questions"][0]["results"]["llama-cpp"]["first_diff"]
    assert first is None or first >= 2, "llama.cpp disagrees with our greedy tokens from the start"
