"""Tokenizer loading: HF folders directly, GGUF files through a converted on-disk cache.

The engine runs on LiteTokenizer (the `tokenizers` library plus a jinja chat template) wherever the
folder holds a tokenizer that transformers would load unchanged from tokenizer.json, because importing
transformers costs seconds at start; anything else, and fine-tuning, gets transformers' own tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pagellm.errors import ModelNotFound
from pagellm.model_source import ModelSource, gguf_cache_dir

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json classes that transformers builds from tokenizer.json as it is
_PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# config.json model types whose tokenizer transformers loads through that plain class (others, e.g.
# Mistral, get a model-specific class or a patched pre-tokenizer)
_PLAIN_MODEL_TYPES = {None, "", "llama", "qwen2"}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class _Encoding(dict):
    """A dict whose keys read as attributes too, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LiteTokenizer:
    """The part of transformers' tokenizer API that the engine uses, on a `tokenizers.Tokenizer`.

    Built only by from_folder(), which returns None for any folder where transformers would change the
    tokenizer while loading it, so every call here answers what transformers' answers.
    """

    add_bos_token = False  # transformers ignores add_bos/eos_token when tokenizer.json exists

    def __init__(self, backend, config: dict[str, Any], chat_template: str | dict[str, str] | None,
                 name_or_path: str) -> None:
        self._backend = backend
        self.name_or_path = name_or_path
        self.tokenizer_class = config.get("tokenizer_class", "TokenizersBackend")
        self.chat_template = chat_template
        self._special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special_tokens = [_token_text(t) for t in extra]

    @classmethod
    def from_folder(cls, folder: str | Path) -> LiteTokenizer | None:
        """The folder's tokenizer, or None where only transformers can load it faithfully."""
        from tokenizers import Tokenizer
        from tokenizers.processors import TemplateProcessing

        folder = Path(folder)
        config = _plain_tokenizer_config(folder)
        if config is None:
            return None
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if not _special_tokens_match(backend, config):
            return None
        if config.get("clean_up_tokenization_spaces") and (
                type(backend.model).__name__ != "BPE"
                or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")):
            return None  # transformers would clean up spaces after decoding (by default not for BPE)
        # NOTE: transformers encodes one text without truncation or padding, even when tokenizer.json sets them
        backend.no_truncation()
        backend.no_padding()
        if backend.post_processor is None:  # what transformers installs then (add_bos/eos_token both off)
            backend.post_processor = TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        return cls(backend, config, _read_chat_template(folder, config), str(folder))

    # ---- special tokens -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # bos_token ... mask_token and their *_id: None when unset, like transformers
        if name.startswith("_"):  # never recurse through a missing _special (copy, pickle)
            raise AttributeError(name)
        if name.endswith("_id") and name[:-3] in SPECIAL_TOKEN_NAMES:
            token = self._special[name[:-3]]
            return None if token is None else self.convert_tokens_to_ids(token)
        if name in SPECIAL_TOKEN_NAMES:
            return self._special[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (what a chat template sees as bos_token, eos_token, ...)."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [t for t in self._special.values() if t is not None] + self.extra_special_tokens
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ---- ids <-> text ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """tokenizer(text).input_ids / ["input_ids"], as with an HF tokenizer (no padding, no tensors)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            return _Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        batch = [self.encode(t, add_special_tokens=add_special_tokens) for t in text]
        return _Encoding(input_ids=batch, attention_mask=[[1] * len(ids) for ids in batch])

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self._backend.token_to_id(token)
        if index is not None:
            return index
        unk = self._special["unk_token"]
        return None if unk is None else self._backend.token_to_id(unk)

    # ---- chat ------------------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """A template by name or text, else the tokenizer's (its "tool_use" one when tools are given)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Pass a chat "
                                 "template or the name of one as `chat_template`. Available template names are "
                                 f"{sorted(templates)}.")
            return chat_template
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and no "
                             "template argument was passed!")
        return templates

    def apply_chat_template(self, conversation: list[dict[str, Any]], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, **kwargs: Any) -> str:
        """The rendered text of one conversation (tokenize=False); encode it with add_special_tokens=False."""
        from pagellm.chat_template import render_chat

        if tokenize:
            raise NotImplementedError("LiteTokenizer.apply_chat_template renders text only: pass tokenize=False "
                                      "and encode the text with add_special_tokens=False")
        template = self.get_chat_template(chat_template, tools)
        variables = {**self.special_tokens_map, **kwargs}  # the caller's values win
        return render_chat(template, conversation, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, tools=tools, documents=documents,
                           **variables)


def _plain_tokenizer_config(folder: Path) -> dict[str, Any] | None:
    """tokenizer_config.json when transformers would load this folder's tokenizer.json unchanged, else None."""
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return None
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in _PLAIN_CLASSES or "auto_map" in config:
        return None
    if "fast_tokenizer_files" in config or config.get("split_special_tokens"):
        return None
    if (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if model_config.get("model_type") not in _PLAIN_MODEL_TYPES:
            return None
    # NOTE: model-specific special tokens (image_token, ...) and legacy special-token files change what
    # transformers adds; leave those to it
    if any(key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES and isinstance(value, str | dict)
           for key, value in config.items()):
        return None
    if isinstance(config.get("extra_special_tokens"), dict):
        return None
    if "added_tokens_decoder" not in config and any(
            (folder / name).exists() for name in ("special_tokens_map.json", "added_tokens.json")):
        return None
    return config


def _special_tokens_match(backend, config: dict[str, Any]) -> bool:
    """True when transformers would add no token: every special token (and every added token the config
    lists) is already a special added token of tokenizer.json, with the same flags."""
    added = {str(tok.content): (index, tok) for index, tok in backend.get_added_tokens_decoder().items()}
    wanted: list[Any] = [config.get(name) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None]
    wanted += config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    for value in wanted:
        entry = added.get(_token_text(value))
        if entry is None or not entry[1].special or entry[1].normalized:
            return False
        if isinstance(value, dict) and any(
                flag in value and value[flag] != getattr(entry[1], flag) for flag in _ADDED_TOKEN_FLAGS):
            return False
    for index, value in (config.get("added_tokens_decoder") or {}).items():
        entry = added.get(_token_text(value))
        if entry is None or entry[0] != int(index) or any(
                flag in value and value[flag] != getattr(entry[1], flag) for flag in _ADDED_TOKEN_FLAGS):
            return False
    return True


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja (+ additional_chat_templates/*.jinja), else tokenizer_config.json's chat_template."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list | tuple):
        return {t["name"]: t["template"] for t in template}
    return template


def _tokenizer_folder(source: ModelSource, tokenizer: str | None) -> Path | None:
    """Where the tokenizer files are: --tokenizer, the HF folder, or the GGUF file's converted cache (None
    until the first conversion)."""
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise ModelNotFound(f"tokenizer {tokenizer!r} not found locally")
        return Path(tokenizer)
    if source.format == "hf":
        return source.path
    cache = gguf_cache_dir(source.path, "tokenizer")
    return cache if (cache / "tokenizer.json").is_file() else None


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """The engine's tokenizer: a LiteTokenizer where the folder allows it, else transformers' (see module doc)."""
    folder = _tokenizer_folder(source, tokenizer)
    converted = None
    if folder is None:  # a GGUF file seen for the first time: convert (and cache) with transformers
        converted = load_hf_tokenizer(source, tokenizer)
        folder = _tokenizer_folder(source, tokenizer)
    if folder is not None and folder.is_dir():
        lite = LiteTokenizer.from_folder(folder)
        if lite is not None:
            return lite
    return converted if converted is not None else load_hf_tokenizer(source, tokenizer)


def load_hf_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """Return a transformers fast tokenizer with its chat template.

    NOTE: building a tokenizer from GGUF metadata takes ~10 s, so the converted tokenizer is
    saved once under ~/.cache/pagellm (PAGELLM_CACHE overrides) and reloaded from there.
    """
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(source, tokenizer)
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    cache = gguf_cache_dir(source.path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race, or a read-only cache
    return tok
