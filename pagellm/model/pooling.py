"""Pooling over packed hidden states: one vector per sequence from a flat [num_tokens, hidden] tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from pagellm.errors import InvalidRequest
from pagellm.pooling_params import PoolerConfig

# sentence-transformers 1_Pooling/config.json flag -> our pooling type
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_ST_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                         "pooling_mode_weightedmean_tokens")
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def pool(hidden: torch.Tensor, seq_lens: list[int], pooling_type: str) -> torch.Tensor:
    """hidden: [num_tokens, hidden] of sequences laid end to end -> float32 [num_seqs, hidden].

    `mean` averages every token of a sequence (special tokens included, as sentence-transformers
    does with its attention mask), `cls` takes each sequence's first token, `last` its last one.
    """
    assert sum(seq_lens) == hidden.shape[0], f"seq_lens sum {sum(seq_lens)} != {hidden.shape[0]} tokens"
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = lens.cumsum(0)  # [num_seqs]
    if pooling_type == "cls":
        return hidden[ends - lens].float()
    if pooling_type == "last":
        return hidden[ends - 1].float()
    if pooling_type == "mean":
        seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)  # [num_tokens]
        sums = torch.zeros(len(seq_lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seq_ids, hidden.float())  # [num_seqs, hidden]
        return sums / lens[:, None].to(torch.float32)
    raise AssertionError(f"unknown pooling type {pooling_type!r}")


def maybe_normalize(pooled: torch.Tensor, normalize: bool) -> torch.Tensor:
    """L2-normalize rows of [num_seqs, hidden] when asked."""
    return F.normalize(pooled, p=2.0, dim=-1) if normalize else pooled


def classification_probs(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """logits: [num_seqs, num_labels] -> probabilities (softmax, or sigmoid per label)."""
    logits = logits.float()
    if multi_label or logits.shape[-1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def read_sentence_transformers_pooler(folder: Path) -> PoolerConfig | None:
    """The pooling of a sentence-transformers folder (modules.json + Pooling config), or None.

    Raises InvalidRequest for module stacks pagellm would silently compute differently
    (Dense projections, max or weighted-mean pooling).
    """
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read {modules_file}: {exc}", param="model") from exc
    pooling_type: str | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _ST_MODULES:
            raise InvalidRequest(f"sentence-transformers module {module.get('type')!r} is not supported "
                                 f"(supported: {', '.join(_ST_MODULES)})", param="model")
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            pooling_type = _read_st_pooling_mode(folder / module.get("path", "") / "config.json")
    if pooling_type is None:
        return None
    return PoolerConfig(pooling_type=pooling_type, normalize=normalize)  # type: ignore[arg-type]


def _read_st_pooling_mode(config_file: Path) -> str:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read {config_file}: {exc}", param="model") from exc
    unsupported = [k for k in _ST_UNSUPPORTED_MODES if config.get(k)]
    modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
    if unsupported or len(modes) != 1:
        raise InvalidRequest(f"{config_file}: exactly one of mean/cls/lasttoken pooling is supported, "
                             f"got {sorted(k for k, v in config.items() if k.startswith('pooling_mode') and v)}",
                             param="model")
    return modes[0]
