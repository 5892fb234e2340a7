"""POST /classify on a generate server: zero-shot classification with the request's `labels` (a pagellm extension)."""

from __future__ import annotations

from pagellm.engine.label_scorer import LabelScorer, score_with_async_engine
from pagellm.entrypoints.openai.errors import APIError
from pagellm.entrypoints.openai.protocol import ClassificationRequest, ClassificationResponse, PoolingUsage
from pagellm.entrypoints.openai.serving_engine import OpenAIServing, new_request_id
from pagellm.entrypoints.openai.serving_pooling import classification_data, pooling_prompts
from pagellm.errors import InvalidRequest


class OpenAIServingZeroShotClassification(OpenAIServing):
    """Scores each label's log-likelihood after one prompt per text (pagellm.engine.label_scorer)."""

    async def create_classification(self, req: ClassificationRequest) -> ClassificationResponse:
        lora = self.resolve_model(req.model)
        labels, instruction = req.labels, req.instruction
        task = self.loras.tasks.get(lora.lora_name) if lora is not None and self.loras is not None else None
        if labels is None and task and task.get("labels"):  # a classification adapter names its labels
            labels, instruction = task["labels"], instruction or task.get("instruction")
        if labels is None:
            raise APIError(400, "this server runs a generative model: /classify is zero-shot here and needs "
                                "'labels', the class names to score (or serve a *ForSequenceClassification model "
                                "with --task classify)", param="labels")
        if req.truncate_prompt_tokens is not None:
            raise InvalidRequest("truncate_prompt_tokens is not supported for zero-shot classification",
                                 param="truncate_prompt_tokens")
        if req.return_embedding:
            raise InvalidRequest("return_embedding needs a classification model (--task classify): zero-shot "
                                 "classification pools nothing", param="return_embedding")
        texts = pooling_prompts(req.input)
        if any(not isinstance(text, str) for text in texts):
            raise InvalidRequest("zero-shot classification takes texts, not token ids: each text goes inside "
                                 "the label prompt", param="input")
        scorer = LabelScorer(self.tokenizer, labels, instruction)
        plans = scorer.plans(texts, self.engine.check_prompt)
        # NOTE: at most max_num_seqs texts are in flight (label_scorer), each with one request per label.
        max_num_seqs = self.engine.model_info().max_num_seqs
        self.check_admission(min(len(plans), max_num_seqs) * len(scorer.labels))
        request_id = new_request_id("classify")
        probs = await score_with_async_engine(self.engine, plans, request_id, lora)
        num_tokens = sum(plan.num_prompt_tokens for plan in plans)
        return ClassificationResponse(id=request_id, model=self.model_name,
                                      data=classification_data(probs, scorer.labels),
                                      usage=PoolingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
