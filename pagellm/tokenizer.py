"""Tokenizer loading: HF folders directly, GGUF files through a converted on-disk cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pagellm.errors import ModelNotFound
from pagellm.model.loader.resolve import ModelSource, gguf_cache_dir


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """Return a transformers fast tokenizer with its chat template.

    NOTE: building a tokenizer from GGUF metadata takes ~10 s, so the converted tokenizer is
    saved once under ~/.cache/pagellm (PAGELLM_CACHE overrides) and reloaded from there.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise ModelNotFound(f"tokenizer {tokenizer!r} not found locally")
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if source.format == "hf":
        return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    cache = gguf_cache_dir(source.path, "tokenizer")
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or a read-only cache
    return tok
