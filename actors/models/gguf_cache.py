"""Converted-weights cache for GGUF models.

Dequantising a GGUF (and parsing its tokenizer and config) takes ~20 s at every start; the same
weights read back from safetensors take a fraction of a second. The first load of a GGUF at a dtype
writes an ordinary HF model directory (config, generation config, tokenizer, model.safetensors) to

    $DRAFTHORSE_CACHE_DIR/models/<sha256 of the GGUF, 24 hex>-<dtype>/     (default ~/.cache/drafthorse)

with a manifest (drafthorse.json) holding the sha256 of every file in it; `--dtype int4` also keeps the
products it packed from the GGUF's blocks (`<sha>-int4-codes/`: reading the file's metadata and
checking the blocks take ~8 s, the packed codes load in well under one) and a tokenizer-only load its
tokenizer (`<sha>-tokenizer/`: parsing it from the GGUF takes ~10 s). Later loads verify those
checksums before trusting the directory: a corrupted or partial entry is removed and rebuilt from
the GGUF, never loaded. Entries are written to a temporary directory and renamed into place, so a
crash mid-write leaves no entry. DRAFTHORSE_CACHE_DIR=off disables the cache."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .quant import Int4Weight

log = logging.getLogger(__name__)

CACHE_ENV = "DRAFTHORSE_CACHE_DIR"
FORMAT = 1
MANIFEST = "drafthorse.json"
CODES, CODES_FILE = "int4-codes", "codes.safetensors"   # int4: the products packed from the GGUF's blocks
TOKENIZER = "tokenizer"   # the tokenizer alone (tiny test models and tokenizer-only loads: ~10 s parsing a GGUF)


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is off."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "none", "0", "false"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "drafthorse"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def entry_dir(gguf_sha: str, dtype: str, root: Path | None = None) -> Path | None:
    root = root or cache_root()
    return None if root is None else root / "models" / f"{gguf_sha[:24]}-{dtype}"


def _versions() -> dict:
    # torch: int4 codes are stored in its kernel's own packed layout
    return {"format": FORMAT, "transformers": transformers.__version__, "torch": torch.__version__}


def load(gguf_sha: str, dtype: str):
    """(hf model, tokenizer) from a verified cache entry, or None (no entry, stale or corrupted:
    then the entry is removed and the caller converts the GGUF again)."""
    d = _verified(gguf_sha, dtype, ("model.safetensors", "config.json"))
    if d is None:
        return None
    tok = AutoTokenizer.from_pretrained(d) if (d / "tokenizer_config.json").is_file() else None
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
    return hf, tok


def load_tokenizer(gguf_sha: str):
    """A GGUF's tokenizer from a verified entry, or None."""
    d = _verified(gguf_sha, TOKENIZER, ("tokenizer_config.json",))
    return None if d is None else AutoTokenizer.from_pretrained(d)


def store_tokenizer(gguf_sha: str, tokenizer) -> Path | None:
    return _write(gguf_sha, TOKENIZER, tokenizer.save_pretrained)


def load_codes(gguf_sha: str) -> dict[str, Int4Weight] | None:
    """The int4 products packed from a GGUF's blocks (gguf_blocks.products) from a verified entry, or None."""
    d = _verified(gguf_sha, CODES, (CODES_FILE,))
    if d is None:
        return None
    with safe_open(d / CODES_FILE, "pt") as f:
        layout = json.loads(f.metadata()["layout"])
        return {name: Int4Weight.packed_as(f.get_tensor(f"{name}.packed"), f.get_tensor(f"{name}.scale_zero"),
                                           (k, n), halves)
                for name, (k, n, halves) in layout.items()}


def store_codes(gguf_sha: str, codes: dict[str, Int4Weight]) -> Path | None:
    """Write the int4 products packed from a GGUF's blocks; returns the entry's folder (None: cache off or
    the write failed)."""
    def write(tmp: Path) -> None:
        tensors = {f"{name}.{part}": getattr(w, part) for name, w in codes.items() for part in ("packed", "scale_zero")}
        layout = {name: [*w.shape, w.halves] for name, w in codes.items()}
        save_file(tensors, tmp / CODES_FILE, metadata={"format": "pt", "layout": json.dumps(layout)})
    return _write(gguf_sha, CODES, write)


def _verified(gguf_sha: str, dtype: str, required: tuple[str, ...]) -> Path | None:
    """An entry's folder once its manifest and every file's checksum hold; else None, the entry removed."""
    d = entry_dir(gguf_sha, dtype)
    if d is None or not (d / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        if manifest.get("versions") != _versions() or manifest.get("gguf_sha256") != gguf_sha \
                or manifest.get("dtype") != dtype:
            raise ValueError("written by another version")
        files = manifest["files"]
        if any(name not in files for name in required):
            raise ValueError("incomplete manifest")
        for name, want in files.items():
            if file_sha256(d / name) != want:
                raise ValueError(f"checksum mismatch in {name}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("weights cache %s is unusable (%s): rebuilding it from the GGUF", d, e)
        shutil.rmtree(d, ignore_errors=True)
        return None
    return d


def store(gguf_sha: str, dtype: str, hf: PreTrainedModel, tokenizer) -> Path | None:
    """Write a cache entry for a model just converted from a GGUF; returns its folder (None when the
    cache is off or the write failed: a cache is never worth failing a load for)."""
    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
        if getattr(hf.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)   # tied to the embedding: stored once
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        hf.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)      # plain weights now, not a quantized checkpoint
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return _write(gguf_sha, dtype, write)


def _write(gguf_sha: str, dtype: str, write: Callable[[Path], None]) -> Path | None:
    """An entry written by write(folder) into a temporary folder, its manifest beside, renamed into place."""
    d = entry_dir(gguf_sha, dtype)
    if d is None:
        return None
    tmp = None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=d.name + ".tmp-", dir=d.parent))
        write(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"versions": _versions(), "gguf_sha256": gguf_sha, "dtype": dtype, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)                       # mkdtemp made it private
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        return d
    except OSError as e:
        log.warning("could not write the weights cache %s: %s", d, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
