"""`drafthorse distill`: the self-distillation corpus as token-id shards, written by the target itself,
resumed where a run stopped, refused when a run's recipe differs, and read back for training."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.training import tokens
from drafthorse.cluster.cli import app

QUESTIONS = [{"question_id": i, "category": c, "turns": t} for i, (c, t) in enumerate([
    ("writing", ["Write a short story about a robot.", "Now make it rhyme."]),
    ("writing", ["Describe a sunset over the sea.", "Shorter, please."]),
    ("writing", ["Write a poem about rain."]),
    ("math", ["What is 12 times 12?", "And 13 times 13?"]),
    ("math", ["Solve x + 3 = 10."])])]


def _distill(q, out, *extra: str):
    return CliRunner().invoke(app, ["distill", "--model", "tiny:0", "--prompts", str(q), "--out", str(out),
                                    "--holdout-per-category", "1", "--question-shards", "2",
                                    "--invented-shards", "1", "--invented", "3", "--max-new-tokens", "10",
                                    "--batch-size", "3", *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    q = d / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    first = _distill(q, d / "corpus", "--shards", "2")
    assert first.exit_code == 0, first.output
    second = _distill(q, d / "corpus", "--dtype", "int8")   # (as a machine of another class resumes one)
    assert second.exit_code == 0, second.output
    return q, d / "corpus", json.loads(first.stdout.strip().splitlines()[-1]), \
        json.loads(second.stdout.strip().splitlines()[-1])


def test_a_second_run_resumes_at_the_first_missing_shard(corpus):
    _, out, first, second = corpus
    assert (first["shards_done"], first["made_now"]) == (2, 2)
    assert (second["shards_done"], second["made_now"], second["shards"]) == (3, 1, 3)
    assert first["answer_tokens"] > 0   # (a random tiny model invents no finished user turn: shard 2 is empty)
    assert second["dtypes"] == {"0": "float64", "1": "float64", "2": "int8"}   # each shard says its own
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "shard-00000.safetensors",
                                                     "shard-00001.safetensors", "shard-00002.safetensors"]


def test_a_run_with_another_recipe_is_refused(corpus):
    q, out, _, _ = corpus
    r = _distill(q, out, "--seed", "1")
    assert r.exit_code == 2 and "another recipe (differs in seed)" in r.output


def _kinds(shard: tokens.Shard) -> list[str]:
    return [tokens.KINDS[k] for k in shard.kinds]


def test_question_shards_hold_every_training_question_with_a_second_turn(corpus):
    _, out, _, _ = corpus
    tokenizer = loader.load("tiny:0", "auto").tokenizer
    recipe = tokens.read_recipe(out)
    assert [q["question_id"] for q in recipe.questions] == [1, 2, 4]   # the first of each category held out
    greedy, sampled, invented = (tokens.Shard.load(tokens.shard_path(out, k)) for k in range(3))
    assert _kinds(greedy) == ["question"] * 3 + ["question-turn2"] * 3 and set(greedy.temps) == {0.0}
    assert set(_kinds(sampled)) <= {"question", "question-turn2"} and set(sampled.temps) == {tokens.TEMPERATURES[0]}
    assert sampled.seqs[0][:sampled.prompt_lens[0]] == greedy.seqs[0][:greedy.prompt_lens[0]]
    assert sampled.seqs[0] != greedy.seqs[0]
    # a second turn's prompt holds the first turn's answer, then the question's own second turn or a follow-up
    for j, then in [(3, QUESTIONS[1]["turns"][1]), (4, tokens.FOLLOW_UPS[1]), (5, tokens.FOLLOW_UPS[2])]:
        answer = tokenizer.decode(greedy.seqs[j - 3][greedy.prompt_lens[j - 3]:], skip_special_tokens=True)
        text = tokenizer.decode(greedy.seqs[j][:greedy.prompt_lens[j]])
        assert text.count("<|im_start|>user") == 2 and answer.strip() in text and then in text, text
    seqs, plens, meta = tokens.load(out)
    assert len(seqs) == meta["sequences"] == sum(len(s.seqs) for s in (greedy, sampled, invented))
    assert meta["answer_tokens"] == sum(len(s) - p for s, p in zip(seqs, plens))
    half, half_plens, half_meta = tokens.load(out, max_answer_tokens=meta["answer_tokens"] // 2)
    assert meta["answer_tokens"] // 2 <= half_meta["answer_tokens"] < meta["answer_tokens"]
    assert tokens.load(out, max_answer_tokens=meta["answer_tokens"] // 2)[0] == half   # the same subset


def test_greedy_answers_are_the_targets_own_decoding_alone(corpus):
    """Batched generation (a shared pool, continuous batching) writes what the target decodes alone."""
    _, out, _, _ = corpus
    lm = loader.load("tiny:0", "auto")
    greedy = tokens.Shard.load(tokens.shard_path(out, 0))
    stop = tokens.stop_ids(lm)
    engine = SpecEngine(ModelRunner(lm.model), stop, None)
    for seq, plen in zip(greedy.seqs, greedy.prompt_lens):
        alone = engine.generate(seq[:plen], SamplingParams(max_new_tokens=10)).token_ids
        assert seq[plen:] == alone


@pytest.mark.smollm2
def test_invented_shards_answer_user_turns_the_target_wrote(tmp_path):
    lm = loader.load("smollm2", "auto")
    recipe = tokens.Recipe(lm.name, lm.dtype, QUESTIONS[:1], question_shards=1, invented_shards=1, invented=4,
                           max_new_tokens=8)
    tokens.build(lm, tmp_path, recipe, batch_size=4)
    shard = tokens.Shard.load(tokens.shard_path(tmp_path, 1))
    n = len(shard.seqs) // 2
    assert n >= 2 and _kinds(shard) == ["invented"] * 2 * n
    assert shard.temps == [0.0] * n + [recipe.temperature(1)] * n   # each answered greedily, then sampled
    assert [s[:p] for s, p in zip(shard.seqs, shard.prompt_lens)][:n] == \
        [s[:p] for s, p in zip(shard.seqs, shard.prompt_lens)][n:]
    text = lm.tokenizer.decode(shard.seqs[0][:shard.prompt_lens[0]])
    assert text.count("<|im_start|>user") == 1 and text.endswith("<|im_start|>assistant\n")


def test_train_drafter_reads_the_corpus(corpus, tmp_path):
    """`train-drafter --corpus`: features computed from the shards (cached), a subset by --train-tokens,
    and the head drafts losslessly."""
    q, out, _, _ = corpus
    args = ["train-drafter", "--kind", "eagle3", "--model", "tiny:0", "--prompts", str(q), "--corpus", str(out),
            "--data", str(tmp_path / "feats.safetensors"), "--epochs", "1", "--exit-layer", "1",
            "--draft-vocab", "256", "--ttt-steps", "2"]
    first = CliRunner().invoke(app, [*args, "--train-tokens", "30", "--out", str(tmp_path / "subset.safetensors")])
    assert first.exit_code == 0, first.output
    assert "corpus: wrote" in first.output
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "eagle3.safetensors")])
    assert again.exit_code == 0 and "corpus: wrote" not in again.output   # the features file is read back
    head = json.loads(again.stdout.strip().splitlines()[-1])
    assert head["kind"] == "eagle3" and len(head["val_top1_per_depth"]) == 2
    info = {}
    for name in ("subset", "eagle3"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            info[name] = json.loads(f.metadata()["info"])
    assert 30 <= info["subset"]["train_answer_tokens"] < info["eagle3"]["train_answer_tokens"]
    gen = ["generate", "Tell me a story.", "--model", "tiny:0", "--max-new-tokens", "24", "--json"]
    plain = json.loads(CliRunner().invoke(app, [*gen, "--drafter", "none"]).stdout)
    spec = json.loads(CliRunner().invoke(app, [*gen, "--drafter", "eagle3", "--head",
                                                str(tmp_path / "eagle3.safetensors")]).stdout)
    assert spec["token_ids"] == plain["token_ids"] and spec["stats"]["drafted_tokens"] > 0
    too_many = CliRunner().invoke(app, [*args, "--train-tokens", "100000", "--out", str(tmp_path / "x.safetensors")])
    assert too_many.exit_code == 2 and "the training split has" in too_many.output


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="drafthorse distill"):
        tokens.load(tmp_path)


def test_learning_curve_trains_and_benches_each_budget(corpus, tmp_path):
    """`drafthorse learning-curve`: a head per kind and budget on the same cached features, benched beside
    plain decoding on held-out questions; budgets beyond the training split and held-in questions refused."""
    q, out, _, _ = corpus
    args = ["learning-curve", "--corpus", str(out), "--model", "tiny:0", "--prompts", str(q), "--kinds",
            "eagle,eagle3", "--max-new-tokens", "8", "--epochs", "1", "--exit-layer", "1", "--draft-vocab", "256",
            "--ttt-steps", "2", "--data", str(tmp_path / "feats.safetensors"), "--out", str(tmp_path / "curve")]
    r = CliRunner().invoke(app, [*args, "--per-category", "1", "--tokens", "10,30"])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [(p["kind"], p["train_tokens"]) for p in result["points"]] == \
        [("eagle", 10), ("eagle3", 10), ("eagle", 30), ("eagle3", 30)]
    for p in result["points"]:
        assert p["tau"] >= 1.0 and p["equal_to_ar"]["equal"] == p["equal_to_ar"]["total"] == 2
        assert len(p["val_top1_per_depth"]) == 2   # eagle: its pass and its unrolled one; eagle3: --ttt-steps
    assert result["env"]["question_ids"] == [0, 3]   # the held-out first question of each category
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 0
    assert sorted(f.name for f in (tmp_path / "curve" / "heads").iterdir()) == \
        ["eagle-10.safetensors", "eagle-30.safetensors", "eagle3-10.safetensors", "eagle3-30.safetensors"]
    assert "| eagle3 | 30 |" in r.output
    # the same settings into the same directory: the budgets done are kept, not trained again
    heads = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "curve" / "heads").iterdir()}
    again = CliRunner().invoke(app, [*args, "--per-category", "1", "--tokens", "30,10"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "curve" / "curve.json").read_text())["points"] == result["points"]
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "curve" / "heads").iterdir()} == heads
    other = CliRunner().invoke(app, [*args, "--per-category", "1", "--tokens", "10", "--lr", "0.5"])
    assert other.exit_code == 2 and "differs in lr" in other.output
    held_in = CliRunner().invoke(app, [*args, "--per-category", "2", "--tokens", "10"])
    assert held_in.exit_code == 2 and "in the corpus's training split" in held_in.output
    too_many = CliRunner().invoke(app, [*args, "--per-category", "1", "--tokens", "10,100000"])
    assert too_many.exit_code == 2 and "exceed the" in too_many.output
