"""Results of the pooling tasks, shaped like vLLM's EmbeddingRequestOutput / ClassificationRequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbeddingOutput:
    """One prompt's pooled (optionally L2-normalized) vector."""

    embedding: list[float]  # [hidden_size]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    """Per-label probabilities of one prompt.

    ``probs[i]`` is the probability of class id ``i``; ``labels[i]`` is its name from the
    model's ``config.id2label``; ``label_probs`` maps name -> probability and ``label`` is the
    most likely name. Single-label heads use softmax (probs sum to 1); heads with one logit or
    ``problem_type == "multi_label_classification"`` use a sigmoid per label. ``embedding`` is the
    prompt's pooled vector from the same forward, when asked (``PoolingParams(return_embedding=True)``).
    """

    probs: list[float]  # [num_classes]
    labels: list[str] = field(default_factory=list)  # [num_classes], class id order
    embedding: list[float] | None = None  # [hidden_size], only with PoolingParams(return_embedding=True)

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    @property
    def label_probs(self) -> dict[str, float]:
        return dict(zip(self.labels, self.probs))

    @property
    def label(self) -> str:
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]


@dataclass
class EmbeddingRequestOutput:
    """The embedding of one prompt (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ClassificationRequestOutput:
    """The classification of one prompt (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True
