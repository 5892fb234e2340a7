"""Pooling settings: the model-level PoolerConfig and the per-call PoolingParams (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pagellm.errors import InvalidRequest

PoolingType = Literal["mean", "cls", "last"]
POOLING_TYPES: tuple[str, ...] = ("mean", "cls", "last")
# The tasks a pooling model runs (vLLM's names); "generate" is the decoder's
POOLING_TASKS: tuple[str, ...] = ("embed", "classify")


@dataclass(frozen=True)
class PoolerConfig:
    """How hidden states become one vector per prompt; None fields take the model's defaults.

    Defaults come from a sentence-transformers folder (modules.json, 1_Pooling/config.json)
    when present, else a `pagellm finetune` classifier's `classifier_pooling` (the pooling its encoder was
    trained with) + normalize, else `cls` + normalize for encoders (vLLM's default) and `last` for decoders.
    """

    pooling_type: PoolingType | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise InvalidRequest(
                f"pooling_type must be one of {', '.join(POOLING_TYPES)}; got {self.pooling_type!r}",
                param="pooling_type",
            )

    def merged_over(self, defaults: PoolerConfig) -> PoolerConfig:
        """This config's set fields over `defaults`."""
        return PoolerConfig(
            pooling_type=self.pooling_type if self.pooling_type is not None else defaults.pooling_type,
            normalize=self.normalize if self.normalize is not None else defaults.normalize,
        )


@dataclass(frozen=True)
class PoolingParams:
    """Per-call options of `LLM.embed` and `LLM.classify`; None keeps the model's PoolerConfig.

    `return_embedding` (classify only): each `ClassificationOutput.embedding` also holds the prompt's pooled
    vector from the same forward pass, pooled and normalized as `LLM(<same folder>, task="embed")` would
    (the model's PoolerConfig; `normalize` here overrides it). A frozen-encoder head (`pagellm finetune
    --strategy head`) has its base encoder's weights, so this vector equals the base encoder's embedding and
    one pass gives both the class probabilities and the embedding.
    """

    normalize: bool | None = None
    return_embedding: bool = False


# vLLM's default pooler for encoders without a sentence-transformers config
ENCODER_DEFAULT_POOLER = PoolerConfig(pooling_type="cls", normalize=True)
