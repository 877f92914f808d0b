"""`drafthorse train-drafter` end to end on a tiny target: corpus written then reused, a head saved,
`generate --drafter KIND --head PATH` lossless with it, and a head refused by another target."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from drafthorse.cluster.cli import app

QUESTIONS = [{"question_id": i, "category": c, "turns": [t]} for i, (c, t) in enumerate([
    ("writing", "Write a short story about a robot."), ("writing", "Describe a sunset over the sea."),
    ("writing", "Write a poem about rain."), ("math", "What is 12 times 12?"),
    ("math", "Solve x + 3 = 10."), ("math", "What is the square root of 81?")])]


def _run(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def _json(*args: str) -> dict:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    q = d / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    heads = {}
    for kind in ("medusa", "eagle", "eagle3"):
        r = CliRunner().invoke(app, [
            "train-drafter", "--kind", kind, "--model", "tiny:0", "--prompts", str(q),
            "--out", str(d / f"{kind}.safetensors"), "--data", str(d / "corpus.safetensors"),
            "--holdout-per-category", "1", "--max-new-tokens", "16", "--samples", "1",
            "--epochs", "1", "--exit-layer", "1", "--medusa-heads", "2", "--draft-vocab", "512"])
        assert r.exit_code == 0, r.output
        heads[kind] = (d / f"{kind}.safetensors", r.output, json.loads(r.stdout.strip().splitlines()[-1]))
    return heads


def test_train_drafter_writes_a_head_and_reuses_the_corpus(trained):
    first, second = trained["medusa"][1], trained["eagle"][1]
    assert "corpus: wrote" in first and "corpus: wrote" not in second   # the second kind reads it back
    report = trained["medusa"][2]
    assert report["kind"] == "medusa" and report["val_loss"] > 0 and len(report["val_top1_per_depth"]) == 2
    assert report["draft_vocab"] <= 512


@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3"])
def test_generate_with_a_trained_head_is_lossless(trained, kind):
    args = ["generate", "Tell me a story.", "--model", "tiny:0", "--max-new-tokens", "24", "--json"]
    plain = _json(*args, "--drafter", "none")
    spec = _json(*args, "--drafter", kind, "--head", str(trained[kind][0]))
    assert spec["token_ids"] == plain["token_ids"] and spec["stats"]["drafted_tokens"] > 0


def test_a_head_for_another_target_is_refused(trained):
    code, out = _run("generate", "hi", "--model", "tiny:1", "--drafter", "medusa", "--head",
                     str(trained["medusa"][0]), "--max-new-tokens", "4")
    assert code == 2 and "trained for target 'tiny:0'" in out


def test_train_drafter_bad_kind():
    code, out = _run("train-drafter", "--kind", "nope", "--out", "x.safetensors")
    assert code == 2 and "eagle, eagle3, medusa, layerskip" in out
