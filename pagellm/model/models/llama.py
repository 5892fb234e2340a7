"""Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU, tied embeddings."""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model.layers.attention import (
    KERNEL_CACHE_DTYPES,
    AttentionMetadata,
    packed_causal_metadata,
    paged_attention,
)
from pagellm.model.layers.kernels import TORCH_PATHS, KernelPlan
from pagellm.model.layers.linear import Linear
from pagellm.model.layers.norm import RMSNorm
from pagellm.model.layers.quant import QuantizedLinear, QuantizedWeight, cat_rows, quantize
from pagellm.model.layers.rotary import RotaryEmbedding, apply_rotary


def rope_settings(config) -> tuple[float, dict | None]:
    """(theta, scaling) from either the transformers 4 or 5 config layout."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or params or None
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), scaling


class LlamaAttention(nn.Module):
    """Fused QKV projection, RoPE, paged attention, output projection."""

    def __init__(self, config, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.layer_idx = 0  # set by the model; picks this layer's prefix-tuning keys/values
        self.decode_kernel = None  # C++ paged decode attention (KernelPlan.attention_module); None: torch
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))

    def use_kernels(self, plan: KernelPlan) -> None:
        self.decode_kernel = plan.attention_module

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor] | None, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = _project(self.qkv_proj, x, meta.lora_mask)
        # q and k are adjacent columns: one rotary call covers both
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if meta.virtual_rows is not None:  # prefix tuning: learned keys/values, used without RoPE
            k[meta.virtual_rows] = meta.virtual_keys[self.layer_idx]
            v[meta.virtual_rows] = meta.virtual_values[self.layer_idx]
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.decode_kernel)  # [T, H, D]
        return _project(self.o_proj, out.reshape(num_tokens, self.q_size), meta.lora_mask)


def _project(layer: nn.Module, x: torch.Tensor, lora_mask: torch.Tensor | None) -> torch.Tensor:
    """layer(x), with the step's LoRA mask where a token uses an adapter (the layer is then a LoRALinear)."""
    return layer.forward(x) if lora_mask is None else layer.forward(x, lora_mask)


class LlamaMLP(nn.Module):
    """SwiGLU with a fused gate/up projection."""

    def __init__(self, config) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, lora_mask: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = _project(self.gate_up_proj, x, lora_mask).chunk(2, dim=-1)
        return _project(self.down_proj, F.silu(gate) * up, lora_mask)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, kv_cache, meta):
        # NOTE: submodules are called through .forward: nn.Module.__call__ (hook checks) costs ~3 ms a
        # decode step over 30 layers, and these modules never carry hooks
        x = x + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, kv_cache, meta)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x), meta.lora_mask)


class LlamaForCausalLM(nn.Module):
    """Token ids in, final hidden states out; logits only for the rows that need them."""

    qkv_bias = False
    kernel_plan: KernelPlan = TORCH_PATHS  # set with the layers' kernels by kernels.apply_kernel_plan at load

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.qkv_bias) for _ in range(config.num_hidden_layers)
        )
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        attn = self.layers[0].self_attn
        theta, scaling = rope_settings(config)
        with torch.device("cpu"):  # tables are real even when the weights start on "meta"
            self.rotary = RotaryEmbedding(attn.head_dim, config.max_position_embeddings, theta, scaling)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, meta: AttentionMetadata) -> torch.Tensor:
        """kv_caches None: a KV-cache-free forward over whole sequences (see packed_causal_metadata)."""
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos, sin = self.rotary.lookup(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches or [None] * len(self.layers)):
            x = layer.forward(x, cos, sin, kv_cache, meta)
        return x

    def decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """A step of single-token decodes only, from tensors alone: what --compile traces."""
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=input_ids.shape[0],
                                 decode_block_table=block_table, decode_seq_lens=seq_lens)
        return self.forward(input_ids, positions, kv_caches, meta)

    def fused_decoder(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """The decoder layers as one C++ call for decode-only steps (csrc/decode_stack.cpp), or None.

        None where it does not apply: a kernel plan without it (no C++ kernels, PAGELLM_FUSED_DECODE=0),
        activations other than float32, a KV cache other than float32/bfloat16, a layer that is not
        a plain (Quantized)Linear (e.g. LoRA), or a tensor-parallel shard (model/parallel.py). The stack
        holds this model's own weight and cache tensors: build it after the weights load.
        """
        plan = self.kernel_plan
        if not plan.fused_decode or self.embed_tokens.weight.dtype != torch.float32:
            return None
        if getattr(self, "tp_group", None) is not None:  # NOTE: the stack has no all-reduce between its layers
            return None
        if any(k.dtype not in KERNEL_CACHE_DTYPES for k, _ in kv_caches):  # e.g. a float16 cache
            return None
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        stack = plan.module.DecodeStack(self.config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                        mlp.intermediate_size, self.layers[0].input_layernorm.eps, attn.scale,
                                        self.rotary.cos, self.rotary.sin, plan.int4_q8_activations)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            projections = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj]
            specs = [_stack_weights(p) for p in projections]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(s is None for s in specs) or any(w.dtype != torch.float32 for w in norms):
                return None
            stack.add_layer(*norms, [s[0] for s in specs], [t for s in specs for t in s[1]], k_cache, v_cache)
        return stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_rows, hidden] -> float32 logits [num_rows, vocab]."""
        return self.lm_head(self.norm(hidden)).float()

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; fused projections are filled slice by slice. Checks coverage."""
        params = dict(self.named_parameters(remove_duplicate=False))
        # QuantizedLinear weights (model loaded with quantization): set whole, fused slices stacked
        qlinears = {f"{n}.weight": m for n, m in self.named_modules() if isinstance(m, QuantizedLinear)}
        pending: dict[str, list[tuple[int, torch.Tensor | QuantizedWeight]]] = {}  # fused slices so far
        attn = self.layers[0].self_attn
        inter = self.layers[0].mlp.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", 0, attn.q_size),
            "k_proj": ("qkv_proj", attn.q_size, attn.kv_size),
            "v_proj": ("qkv_proj", attn.q_size + attn.kv_size, attn.kv_size),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }
        expected = {n for n in params if not (self.tie_word_embeddings and n == "lm_head.weight")}
        expected |= {n for n in qlinears if not (self.tie_word_embeddings and n == "lm_head.weight")}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "embed_tokens.weight" and self.tie_word_embeddings and "lm_head.weight" in qlinears:
                qlinears["lm_head.weight"].set_weight(_as_quantized(tensor, qlinears["lm_head.weight"].scheme))
            if name == "lm_head.weight" and (self.tie_word_embeddings or "lm_head.weight" not in expected):
                continue  # tied, or a pooling model, which has no vocabulary head
            parts = name.split(".")
            target, offset, size = name, None, None
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, offset, size = fused[parts[-2]]
                target = ".".join(parts[:-2] + [fused_name, parts[-1]])
            if target in qlinears:
                module = qlinears[target]
                if offset is None:
                    module.keep_precision_of([tensor])
                    module.set_weight(_as_quantized(tensor, module.scheme))
                    loaded.add(target)
                    continue
                parts = pending.setdefault(target, [])
                parts.append((offset, tensor))
                loaded.add(f"{target}:{offset}")
                if len(parts) == (3 if target.endswith("qkv_proj.weight") else 2):  # every slice is here
                    module.keep_precision_of([t for _, t in parts])
                    ordered = [t for _, t in sorted(parts, key=itemgetter(0))]
                    module.set_weight(cat_rows([_as_quantized(t, module.scheme) for t in ordered]))
                    del pending[target]
                continue
            if target not in params:
                raise ValueError(f"unexpected weight {hf_name!r} (mapped to {target!r})")
            param = params[target]
            if isinstance(tensor, QuantizedWeight):
                tensor = tensor.dequantize(param.dtype)
            with torch.no_grad():
                if offset is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                    param.copy_(tensor)
                    loaded.add(target)
                else:
                    param[offset : offset + size].copy_(tensor)
                    loaded.add(f"{target}:{offset}")
        slices: dict[str, int] = {}
        for key in loaded:
            if ":" in key:
                slices[key.split(":")[0]] = slices.get(key.split(":")[0], 0) + 1
        # every slice of a fused projection must arrive: qkv has 3, gate_up has 2
        fused_done = {n for n, c in slices.items() if c == (3 if "qkv_proj" in n else 2)}
        missing = sorted(n for n in expected if n not in loaded and n not in fused_done)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:8]}{'...' if len(missing) > 8 else ''}")


_STACK_KINDS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}


def _stack_weights(proj: nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, [weight, scales, mins, bias]) of a projection for DecodeStack.add_layer; None if unsupported."""
    empty = torch.empty(0)
    bias = empty if proj.bias is None else proj.bias.detach()
    if bias.numel() and bias.dtype != torch.float32:
        return None
    if type(proj) is QuantizedLinear:
        mins = proj.mins if proj.scheme == "int4" else empty
        return _STACK_KINDS[proj.scheme], [proj.qweight, proj.scales, mins, bias]
    if type(proj) is Linear:
        # a bf16 model computing in float32 keeps a bf16 copy for few-row matmuls (Linear.pack)
        weight = proj.gemv_weight if proj.gemv_weight is not None else proj.weight.detach()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        return _STACK_KINDS[str(weight.dtype).removeprefix("torch.")], [weight.contiguous(), empty, empty, bias]
    return None


def _as_quantized(tensor: torch.Tensor | QuantizedWeight, scheme: str) -> QuantizedWeight:
    return tensor.to_scheme(scheme) if isinstance(tensor, QuantizedWeight) else quantize(tensor, scheme)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 differs from Llama by biases on the q/k/v projections."""

    qkv_bias = True


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral uses the Llama layout (sliding window is not applied: contexts stay within it)."""


# ---- pooling (LLM(task="embed" | "classify")): no KV cache, whole sequences packed end to end ----


class LlamaEmbeddingModel(LlamaForCausalLM):
    """The decoder run once over packed whole sequences without a KV cache; final-normed hidden states out."""

    default_pooling_type = "last"  # a causal model's last token is the only one that saw the whole text

    def __init__(self, config) -> None:
        super().__init__(config)
        del self.lm_head  # NOTE: pooling never needs vocabulary logits; a checkpoint's lm_head is skipped

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """input_ids, positions: [num_tokens] (positions restart at 0 per sequence) -> [num_tokens, hidden]."""
        hidden = super().forward(input_ids, positions, None, packed_causal_metadata(seq_lens))
        return self.norm(hidden)


class Qwen2EmbeddingModel(LlamaEmbeddingModel):
    qkv_bias = True


class LlamaForSequenceClassification(LlamaEmbeddingModel):
    """HF's Llama-family *ForSequenceClassification: a bias-free `score` head on each sequence's last token."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def compute_logits(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """hidden: [num_tokens, hidden] (normed) -> float32 logits [num_seqs, num_labels]."""
        last = torch.tensor(seq_lens, device=hidden.device).cumsum(0) - 1
        return self.score(hidden[last]).float()


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    qkv_bias = True


class MistralForSequenceClassification(LlamaForSequenceClassification):
    """Mistral uses the Llama layout."""
