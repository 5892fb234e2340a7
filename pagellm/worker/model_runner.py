"""ModelRunner: owns the model, the KV cache tensors and the sampler; executes one step."""

from __future__ import annotations

import logging
import time

import torch

from pagellm.config import LoRAConfig
from pagellm.core.sched_output import SchedulerOutput
from pagellm.errors import InvalidRequest
from pagellm.model.layers.kernels import compile_ops
from pagellm.outputs import ModelRunnerOutput
from pagellm.worker.input_batch import build_inputs
from pagellm.worker.lora_manager import LoRAManager
from pagellm.worker.sampler import Sampler, compute_prompt_logprobs

logger = logging.getLogger(__name__)

# Decode-only steps with at most this many sequences run the C++ layer stack (model.fused_decoder);
# its matmuls read each weight once per 8 rows, so larger batches go to the eager path's GEMMs.
FUSED_MAX_ROWS = 16


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose memory is only backed once written.

    NOTE: zeros, not empty: a garbage NaN in an unused slot would leak through masked attention
    (0 * NaN). But torch.zeros writes every page, so a 2 GiB KV cache would be resident from the
    start; numpy's zeros is calloc, which for a large block maps fresh pages that the OS zeroes on
    first touch, so the cache's resident size grows with the blocks actually used.
    """
    import numpy as np

    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}.get(dtype)
    if np_dtype is None:
        return torch.zeros(shape, dtype=dtype)
    tensor = torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * len(model.layers) * block_size * model.num_kv_heads * model.head_dim * itemsize


class ModelRunner:
    """SchedulerOutput in, ModelRunnerOutput out; never touches a Request."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 lora_config: LoRAConfig | None = None, compile: bool = False, max_num_seqs: int = 1,
                 kv_dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        on_gpu = device is not None and device.type != "cpu"
        assert not (on_gpu and compile), "LLMEngine refuses --compile off the CPU"
        self.model = model
        self.lora = LoRAManager(model, lora_config, dtype) if lora_config is not None else None
        self.block_size = block_size
        self.dtype = dtype
        # NOTE: None on the CPU: input tensors are built where torch.tensor puts them, with no device argument
        self.input_device = device if on_gpu else None
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        kv_dtype = kv_dtype or dtype  # NOTE: keys/values are cast on write and read when it differs
        if on_gpu:
            self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=device),
                               torch.zeros(shape, dtype=kv_dtype, device=device)) for _ in model.layers]
        else:
            self.kv_caches = [(lazy_zeros(shape, kv_dtype), lazy_zeros(shape, kv_dtype)) for _ in model.layers]
        self.sampler = Sampler(model.config.vocab_size)
        self.compiled_decode = None
        self.fused_decode = None  # the decoder layers as one C++ call, for decode-only steps
        if on_gpu:  # the C++ kernels are CPU code: every layer takes its torch path
            return
        # NOTE: the C++ kernels were built or loaded with the model (its kernel plan), never in a request's step
        self.compiled_decode = self._compile(max_num_seqs) if compile else None
        if not compile and self.lora is None and hasattr(model, "fused_decoder"):
            self.fused_decode = model.fused_decoder(self.kv_caches)

    def _compile(self, max_num_seqs: int):
        """torch.compile the decode-only step, then trace it now for the batch sizes that need a graph.

        NOTE: shapes are dynamic, so one graph serves a whole range of batch sizes: size 1 (torch
        specializes it) and 2+ are traced here; a batch past a matmul's kernel switch (e.g. more
        rows than KERNEL_MAX_ROWS) fails a guard and compiles one more graph when it first comes.
        Mixed prefill/decode steps run eagerly.
        """
        if self.lora is not None:
            raise InvalidRequest("--compile cannot be combined with LoRA adapters yet", param="compile")
        if not compile_ops():
            logger.warning("--compile needs the C++ kernels, which are unavailable: running eagerly")
            return None
        compiled = torch.compile(self.model.decode_forward, dynamic=True, fullgraph=True)
        start = time.perf_counter()
        for batch in sorted({1, min(2, max_num_seqs)}):
            # a throwaway step on block 0 (no request owns a block yet); lengths 1..batch
            ids = torch.zeros(batch, dtype=torch.long)
            seq_lens = torch.arange(1, batch + 1)
            table = torch.zeros(batch, -(-batch // self.block_size), dtype=torch.long)
            slots = seq_lens - 1
            with torch.inference_mode():
                compiled(ids, seq_lens - 1, self.kv_caches, slots, table, seq_lens)
        for k, v in self.kv_caches:
            k[0].zero_()
            v[0].zero_()
        logger.info("compiled the decode step in %.1f s", time.perf_counter() - start)
        return compiled

    def release(self, req_ids: list[str]) -> None:
        """Forget finished requests' state (their seeded generators)."""
        self.sampler.drop(req_ids)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, sample: bool = True) -> ModelRunnerOutput:
        """sample False (a tensor-parallel rank other than 0): run the forward and the LM head, which hold
        collectives every rank must join, but neither sample nor compute logprobs."""
        self.release(so.finished_req_ids)
        out = ModelRunnerOutput()
        if so.is_empty:
            return out
        inputs = build_inputs(so, self.block_size, self.input_device,
                              fuse_rows=FUSED_MAX_ROWS if self.fused_decode is not None else 0)
        meta = inputs.attn_meta
        if self.lora is not None:
            self.lora.prepare(inputs.requests, meta)  # the step's LoRA mask and prefix K/V, in its metadata
        decode_only = not meta.prefills and meta.virtual_rows is None and meta.decode_seq_lens is not None
        if self.fused_decode is not None and decode_only and meta.num_decode_tokens <= FUSED_MAX_ROWS:
            hidden = self.fused_decode.forward(self.model.embed_tokens(inputs.input_ids), inputs.positions,
                                               meta.slot_mapping, meta.decode_block_table, meta.decode_seq_lens)
        elif self.compiled_decode is not None and decode_only:
            hidden = self.compiled_decode(inputs.input_ids, inputs.positions, self.kv_caches, meta.slot_mapping,
                                          meta.decode_block_table, meta.decode_seq_lens)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
        if inputs.logits_indices.numel() == 0:
            return out
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [rows, vocab] float32
        if not sample:
            return out
        for plp in inputs.prompt_logprob_rows:
            rows = logits[plp.row_start : plp.row_start + len(plp.target_ids)]
            out.prompt_logprobs[plp.req_id] = compute_prompt_logprobs(rows, plp.target_ids, plp.k)
        if inputs.sample_rows:
            self._sample(logits[inputs.num_prompt_logprob_rows :], inputs, so, out)
        return out

    def _sample(self, logits: torch.Tensor, inputs, so: SchedulerOutput, out: ModelRunnerOutput) -> None:
        """One token per plain row; a row with proposals (speculative decoding) is verified, which emits
        1 to 1 + len(proposals) tokens."""
        rows, counts = inputs.sample_rows, inputs.sample_row_counts
        if all(c == 1 for c in counts):
            plain, plain_logits, spec = rows, logits, []
        else:
            starts = [0]
            for c in counts[:-1]:
                starts.append(starts[-1] + c)
            plain_idx = [i for i, c in enumerate(counts) if c == 1]
            plain = [rows[i] for i in plain_idx]
            plain_logits = logits[torch.tensor([starts[i] for i in plain_idx], dtype=torch.long)]
            spec = [(rows[i], logits[starts[i] : starts[i] + counts[i]]) for i, c in enumerate(counts) if c > 1]
        if plain:
            sampled = self.sampler.sample(plain_logits, plain, so.grammar_req_ids, so.grammar_bitmask)
            for req, token_id, lp in zip(plain, sampled.token_ids, sampled.logprobs):
                out.sampled_token_ids[req.req_id] = token_id
                if lp is not None:
                    out.logprobs[req.req_id] = lp
        for req, req_logits in spec:
            masks = None
            if req.req_id in so.grammar_req_ids:  # its consecutive bitmask rows, one per position
                first = so.grammar_req_ids.index(req.req_id)
                masks = so.grammar_bitmask[first : first + req_logits.shape[0]]
            token_ids, logprobs = self.sampler.verify(req_logits, req, masks)
            out.sampled_token_ids[req.req_id] = token_ids[0]
            out.spec_token_ids[req.req_id] = token_ids[1:]
            if logprobs[0] is not None:
                out.logprobs[req.req_id] = logprobs[0]
                out.spec_logprobs[req.req_id] = logprobs[1:]
