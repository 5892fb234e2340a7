"""ModelRunner: owns the model, the KV cache tensors and the sampler; executes one step."""

from __future__ import annotations

import torch

from pagellm.config import LoRAConfig
from pagellm.core.sched_output import SchedulerOutput
from pagellm.model.layers.paged_decode import load_kernel
from pagellm.outputs import ModelRunnerOutput
from pagellm.worker.input_batch import build_inputs
from pagellm.worker.lora_manager import LoRAManager
from pagellm.worker.sampler import Sampler, compute_prompt_logprobs


def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * block_size * model.num_kv_heads * model.head_dim * itemsize


class ModelRunner:
    """SchedulerOutput in, ModelRunnerOutput out; never touches a Request."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 lora_config: LoRAConfig | None = None) -> None:
        self.model = model
        self.lora = LoRAManager(model, lora_config, dtype) if lora_config is not None else None
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # NOTE: torch.zeros, not empty: a garbage NaN in an unused slot would leak through
        # masked attention (0 * NaN). Untouched pages of a large zeros tensor stay lazy.
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers
        ]
        self.sampler = Sampler(model.config.vocab_size)
        load_kernel()  # NOTE: build or load the decode kernel now, never inside a request's first step

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.sampler.drop(so.finished_req_ids)
        out = ModelRunnerOutput()
        if so.is_empty:
            return out
        inputs = build_inputs(so, self.block_size)
        if self.lora is not None:
            virtual = self.lora.prepare(inputs.requests)
            if virtual is not None:
                meta = inputs.attn_meta
                meta.virtual_rows, meta.virtual_keys, meta.virtual_values = virtual.rows, virtual.keys, virtual.values
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
        if inputs.logits_indices.numel() == 0:
            return out
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [rows, vocab] float32
        for plp in inputs.prompt_logprob_rows:
            rows = logits[plp.row_start : plp.row_start + len(plp.target_ids)]
            out.prompt_logprobs[plp.req_id] = compute_prompt_logprobs(rows, plp.target_ids, plp.k)
        if inputs.sample_rows:
            sampled = self.sampler.sample(logits[inputs.num_prompt_logprob_rows :], inputs.sample_rows)
            for req, token_id, lp in zip(inputs.sample_rows, sampled.token_ids, sampled.logprobs):
                out.sampled_token_ids[req.req_id] = token_id
                if lp is not None:
                    out.logprobs[req.req_id] = lp
        return out
