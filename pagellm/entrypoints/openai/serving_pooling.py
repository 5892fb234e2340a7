"""POST /v1/embeddings and POST /classify on a pooling server (`pagellm serve --task embed | classify`)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.errors import APIError
from pagellm.entrypoints.openai.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingInput,
    PoolingUsage,
)
from pagellm.entrypoints.openai.serving_engine import ServingBase, new_request_id
from pagellm.errors import InvalidRequest

MAX_INPUTS = 2048  # OpenAI's limit on the items of one embeddings request


def pooling_prompts(value: PoolingInput) -> list[str | list[int]]:
    """OpenAI's input forms -> one prompt per item (a text or a token-id list)."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequest("input must not be empty", param="input")
    if all(isinstance(item, int) for item in value):
        return [list(value)]  # type: ignore[arg-type]  # one prompt given as token ids
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"input has {len(value)} items; at most {MAX_INPUTS} are allowed", param="input")
    return list(value)  # type: ignore[arg-type]


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or (OpenAI's base64 format) base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def classification_data(probs: Sequence[list[float]], labels: list[str],
                        embeddings: Sequence[list[float]] | None = None) -> list[ClassificationData]:
    """One item per input: its probabilities in class order, the most likely class's name and, when given,
    its pooled embedding."""
    return [ClassificationData(index=i, label=labels[max(range(len(row)), key=row.__getitem__)], probs=row,
                               num_classes=len(row), embedding=None if embeddings is None else embeddings[i])
            for i, row in enumerate(probs)]


class OpenAIServingPooling(ServingBase):
    """Embeddings and classification over an AsyncLLM of task embed or classify (an encoder, or a decoder
    without KV cache)."""

    engine: AsyncLLM

    def _check_task(self, task: str, route: str) -> None:
        if self.engine.task != task:
            raise APIError(400, f"{route} needs a model served with --task {task}; this server runs task "
                                f"{self.engine.task!r}", param="model")

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(req.model)
        self._check_task("embed", "/v1/embeddings")
        hidden_size = self.engine.model_info().hidden_size
        if req.dimensions is not None and req.dimensions != hidden_size:
            raise InvalidRequest(f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                                 f"{hidden_size} dimensions (no Matryoshka truncation)", param="dimensions")
        prompts = pooling_prompts(req.input)
        self.check_admission()
        ids, vectors = await self.engine.encode(prompts, req.truncate_prompt_tokens)
        num_tokens = sum(len(x) for x in ids)
        data = [EmbeddingData(index=i, embedding=encode_embedding(vector, req.encoding_format))
                for i, vector in enumerate(vectors)]
        return EmbeddingResponse(id=new_request_id("embd"), model=self.model_name, data=data,
                                 usage=PoolingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))

    async def create_classification(self, req: ClassificationRequest) -> ClassificationResponse:
        self.check_model(req.model)
        self._check_task("classify", "/classify")
        if req.labels is not None or req.instruction is not None:
            raise InvalidRequest("labels and instruction are for zero-shot classification on a generate server; "
                                 "this classification model has its own labels", param="labels")
        prompts = pooling_prompts(req.input)
        self.check_admission()
        vectors = None
        if req.return_embedding:
            ids, probs, vectors = await self.engine.classify_and_embed(prompts, req.truncate_prompt_tokens)
        else:
            ids, probs = await self.engine.encode(prompts, req.truncate_prompt_tokens)
        num_tokens = sum(len(x) for x in ids)
        return ClassificationResponse(id=new_request_id("classify"), model=self.model_name,
                                      data=classification_data(probs, list(self.engine.model_info().labels), vectors),
                                      usage=PoolingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
