"""`drafthorse throughput`: every method really generates B x max_new_tokens tokens at every batch size (EOS
suppressed on both sides), and the report has the documented shape. Speed itself is the benchmark's to show."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from drafthorse.actors.models import loader
from drafthorse.cluster.tools.throughput import format_table, long_prompt, run_throughput


@pytest.fixture(scope="module")
def tiny():
    return loader.load("tiny:0", max_len=256)


def test_every_method_generates_exactly_the_tokens_it_reports(tiny, tmp_path):
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 3, 4, 5, 3]]   # ragged; batch 4 repeats the first
    result = run_throughput(tiny, prompts, [1, 4], 6, ["ar", "ngram", "hf"], tmp_path)
    assert result == json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert result["env"]["batch_sizes"] == [1, 4] and result["env"]["max_new_tokens"] == 6
    for method in ("ar", "ngram", "hf"):
        for b in (1, 4):
            row = result["methods"][method][str(b)]
            assert row["tokens"] == b * 6, (method, b, row)
            assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"], rel=0.01)
            assert row["step_ms_p50"] > 0
    assert format_table(result).splitlines()[0] == "| batch | ar tok/s | ngram tok/s | hf tok/s | ar / hf |"


def test_eos_does_not_end_a_run_early(tiny, monkeypatch):
    # make the model's EOS the very token greedy decoding picks first: a run that honoured it would stop
    prompt = [5, 6, 7, 8]
    with torch.inference_mode():
        first = int(tiny.hf(torch.tensor([prompt])).logits[0, -1].argmax())
    monkeypatch.setattr(tiny.hf.generation_config, "eos_token_id", first)
    monkeypatch.setattr(tiny, "eos_ids", {first})
    result = run_throughput(tiny, [prompt], [2], 5, ["ar", "hf"])
    assert {m: r["2"]["tokens"] for m, r in result["methods"].items()} == {"ar": 10, "hf": 10}


def test_bad_arguments_are_named(tiny):
    with pytest.raises(ValueError, match="methods must be among ar, ngram, hf, got eagle"):
        run_throughput(tiny, [[1, 2]], [1], 4, ["ar", "eagle"])
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        run_throughput(tiny, [[1, 2]], [0], 4, ["ar"])
    out = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "throughput", "--batch-sizes", "1,x",
                          "--model", "tiny:0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error:" in out.stderr, out.stderr[-500:]


def test_prefill_times_the_first_token_of_a_long_prompt(tiny):
    assert long_prompt([[1, 2, 3], [4]], 10) == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    result = run_throughput(tiny, [[5, 6, 7, 8, 9], [11, 12]], [1], 2, ["ar"], prefill_tokens=200)
    p = result["prefill"]
    assert p["tokens"] == 200 and p["ours_s"] > 0 and p["hf_s"] > 0 and p["same_first_token"] is True
    assert p["ratio"] > 0
    with pytest.raises(ValueError, match="does not fit the model's context of 256"):
        run_throughput(tiny, [[5, 6]], [1], 2, ["ar"], prefill_tokens=400)
