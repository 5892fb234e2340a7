"""device=: validation everywhere; on a machine with CUDA, GPU runs equal HF transformers and the CPU engine.

The GPU tests are skipped without CUDA. Their models come from tests/tiny_models.py (no bundled wheels, no gguf),
so this file runs on a bare GPU machine: `python -m pytest -q tests/worker/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, InvalidRequest, SamplingParams
from pagellm.config import ModelConfig
from pagellm.model.loader.model_loader import resolve_device, resolve_quantization
from pagellm.model_source import ModelSource
from tests.tiny_models import llama_config, qwen2_config, save_causal_lm

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu  # selected by `pytest -m gpu`; tests/conftest.py skips them without CUDA
no_gpu = pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where CUDA is missing")

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# different lengths in one batch: single token, shorter and longer than a block, several blocks
PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([3, 17, 40, 9, 25, 61, 1, 33])]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return save_causal_lm(tmp_path_factory.mktemp("cuda_llama"), llama_config())


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> str:
    return save_causal_lm(tmp_path_factory.mktemp("cuda_qwen2"), qwen2_config())


def _tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _llm(path: str, device: str, **kw) -> LLM:
    args = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=512, block_size=4, num_blocks=512)
    return LLM(path, device=device, **(args | kw))


# ---- validation: runs everywhere -------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "", "mps", "cuda:"])
def test_unknown_device_strings_are_refused(device):
    with pytest.raises(InvalidRequest, match="device must be one of auto, cpu, cuda, cuda:N"):
        ModelConfig(device=device)
    with pytest.raises(InvalidRequest, match="device must be one of"):
        LLM("unused", device=device)


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(device):
    with pytest.raises(InvalidRequest, match=r"torch.cuda.is_available\(\) is False"):
        resolve_device(device)
    with pytest.raises(InvalidRequest, match=rf"device '{device}' requested but torch.cuda.is_available\(\) is False"):
        LLM("unused", device=device)  # refused before any model is read
    with pytest.raises(InvalidRequest, match="is False"):
        LLM("unused", task="embed", device=device)


def test_auto_device_follows_cuda_availability():
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_keeps_cpu_only_features_on_the_cpu(monkeypatch):
    from pagellm.config import LoRAConfig
    from pagellm.worker.worker import pick_device as _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only torch.device objects are made
    assert _pick_device(ModelConfig(), None) == torch.device("cuda")
    for config, lora in ((ModelConfig(compile=True), None), (ModelConfig(quantization="int4"), None),
                         (ModelConfig(), LoRAConfig())):
        assert _pick_device(config, lora) == torch.device("cpu")
    with pytest.raises(InvalidRequest, match="LoRA adapters are not supported on cuda yet"):
        _pick_device(ModelConfig(device="cuda"), LoRAConfig())
    with pytest.raises(InvalidRequest, match="--compile is not supported on cuda yet"):
        _pick_device(ModelConfig(device="cuda", compile=True), None)


def test_explicit_cpu_runs_as_before(llama_dir):
    llm = _llm(llama_dir, "cpu")
    runner = llm.llm_engine.core.worker.runner
    assert llm.llm_engine.worker.device == torch.device("cpu") and runner.input_device is None
    assert all(k.device.type == "cpu" for k, _ in runner.kv_caches)
    assert _tokens(llm) == _tokens(_llm(llama_dir, "auto" if not HAS_CUDA else "cpu", max_num_batched_tokens=16))


def test_packed_quantization_is_refused_off_the_cpu(tmp_path):
    cuda = torch.device("cuda")
    gguf = ModelSource(tmp_path / "m.gguf", "gguf", "m")
    hf = ModelSource(tmp_path, "hf", "m")
    for scheme in ("int8", "int4"):
        with pytest.raises(InvalidRequest, match=f"--quantization {scheme} is not supported on cuda"):
            resolve_quantization(hf, scheme, "auto", cuda)
    # auto: a GGUF dequantizes on a GPU (no packed scheme is looked up, so no file is read)
    assert resolve_quantization(gguf, "auto", "auto", cuda) is None
    assert resolve_quantization(gguf, "none", "auto", cuda) is None
    assert resolve_quantization(hf, "int8", "auto", torch.device("cpu")) == "int8"


def test_cli_passes_device(monkeypatch):
    from pagellm.entrypoints import cli

    args = cli.build_parser().parse_args(["generate", "--device", "cuda:0", "hi"])
    assert cli.engine_kwargs(args)["device"] == "cuda:0"
    assert cli.engine_kwargs(cli.build_parser().parse_args(["generate", "hi"]))["device"] == "auto"


@no_gpu
def test_cli_cuda_without_cuda_exits_2(capsys):
    from pagellm.entrypoints.cli import main

    assert main(["generate", "--device", "cuda", "--no-chat", "hi"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


# ---- on a GPU ----------------------------------------------------------------------------------------------
def _hf_greedy(path: str, prompts, max_new: int, dtype=torch.float32, device="cuda") -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ref = hf.generate(torch.tensor([p], device=device), max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False)
            out.append(ref[0, len(p):].tolist())
    return out


@gpu
@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir"])
def test_cuda_greedy_batch_equals_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    llm = _llm(path, "cuda")
    runner = llm.llm_engine.core.worker.runner
    assert runner.fused_decode is None and runner.compiled_decode is None
    assert all(k.is_cuda and v.is_cuda for k, v in runner.kv_caches)
    assert all(p.is_cuda for p in llm.llm_engine.worker.model.parameters())
    assert _tokens(llm) == _hf_greedy(path, PROMPTS, GREEDY.max_tokens)


@gpu
def test_cuda_equals_cpu_engine(llama_dir):
    assert _tokens(_llm(llama_dir, "cuda")) == _tokens(_llm(llama_dir, "cpu"))


@gpu
def test_cuda_chunked_prefill_equals_whole(llama_dir):
    # a 7-token budget splits every longer prompt into chunks mixed with other requests' decodes
    whole = _tokens(_llm(llama_dir, "cuda", enable_prefix_caching=False))
    assert _tokens(_llm(llama_dir, "cuda", max_num_seqs=4, max_num_batched_tokens=7,
                        enable_prefix_caching=False)) == whole


@gpu
def test_cuda_prefix_cache_hit_equals_miss(llama_dir):
    reference = _tokens(_llm(llama_dir, "cuda", enable_prefix_caching=False))
    llm = _llm(llama_dir, "cuda", max_num_batched_tokens=64)
    assert _tokens(llm) == reference
    assert _tokens(llm) == reference  # the second run reads the blocks the first one cached
    assert llm.llm_engine.core.scheduler.prefix_cache_hits > 0


@gpu
def test_cuda_preempted_equals_roomy(llama_dir):
    reference = _tokens(_llm(llama_dir, "cuda", enable_prefix_caching=False))
    llm = _llm(llama_dir, "cuda", max_num_batched_tokens=64, num_blocks=30, enable_prefix_caching=False)
    assert _tokens(llm) == reference
    assert llm.llm_engine.core.scheduler.num_preemptions > 0


@gpu
def test_cuda_bf16_default_dtype_runs(llama_dir):
    llm = LLM(llama_dir, device="cuda", block_size=16)
    assert llm.llm_engine.worker.model.embed_tokens.weight.dtype == torch.bfloat16  # auto: bf16 computed in bf16
    tokens = _tokens(llm)
    assert [len(t) for t in tokens] == [GREEDY.max_tokens] * len(PROMPTS)
    ref = _hf_greedy(llama_dir, PROMPTS, GREEDY.max_tokens, dtype=torch.bfloat16)
    first_match = sum(a[0] == b[0] for a, b in zip(tokens, ref))
    assert first_match >= len(PROMPTS) - 2, (tokens, ref)  # bf16 kernels differ: near-ties may flip


@gpu
def test_cuda_sampling_logprobs_and_seeds(llama_dir):
    cpu, cuda = _llm(llama_dir, "cpu"), _llm(llama_dir, "cuda")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    a, b = cpu.generate(PROMPTS[:3], params, use_tqdm=False), cuda.generate(PROMPTS[:3], params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):  # {token_id: logprob} per token
            assert lx.keys() == ly.keys() and all(abs(lx[t] - ly[t]) < 1e-3 for t in lx)
        for lx, ly in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:]):  # the first position has none
            assert lx.keys() == ly.keys() and all(abs(lx[t] - ly[t]) < 1e-3 for t in lx)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, seed=7, ignore_eos=True,
                            repetition_penalty=1.1, presence_penalty=0.2)
    first = _tokens(cuda, PROMPTS[:4], seeded)
    assert first == _tokens(cuda, PROMPTS[:4], seeded)  # per-request generators on the GPU
    assert all(len(t) == 16 for t in first)


@gpu
def test_cuda_text_prompts_detokenize(llama_dir):
    out = _llm(llama_dir, "cuda").generate(["w5 w6 w7", "w9"], SamplingParams(max_tokens=5), use_tqdm=False)
    assert all(o.outputs[0].text for o in out)


@gpu
def test_cuda_refuses_compile_lora_and_packed_weights(llama_dir):
    with pytest.raises(InvalidRequest, match="--compile is not supported on cuda"):
        LLM(llama_dir, device="cuda", compile=True)
    with pytest.raises(InvalidRequest, match="LoRA adapters are not supported on cuda"):
        LLM(llama_dir, device="cuda", enable_lora=True)
    with pytest.raises(InvalidRequest, match="--quantization int4 is not supported on cuda"):
        LLM(llama_dir, device="cuda", quantization="int4")


@gpu
def test_cuda_last_token_embeddings_equal_cpu(llama_dir):
    texts = ["w5 w6 w7", "w9", "w100 w101 w102 w103 w104 w105"]
    cpu = LLM(llama_dir, task="embed", dtype="float32", device="cpu").embed(texts, use_tqdm=False)
    cuda = LLM(llama_dir, task="embed", dtype="float32", device="cuda").embed(texts, use_tqdm=False)
    for x, y in zip(cpu, cuda):
        assert torch.allclose(torch.tensor(x.outputs.embedding), torch.tensor(y.outputs.embedding), atol=1e-4)


@gpu
def test_cuda_bert_encoder_equals_transformers(tmp_path):
    from transformers import BertConfig, BertModel

    from pagellm.model.loader.hf_loader import load_hf_config
    from pagellm.model.loader.model_loader import load_encoder
    from pagellm.model.models.registry import get_pooling_model_class
    from pagellm.model_source import resolve_model

    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(tmp_path), safe_serialization=True)
    source = resolve_model(str(tmp_path))
    hf_config = load_hf_config(source.path)
    cls = get_pooling_model_class(hf_config.architectures, "embed")
    device = torch.device("cuda")
    ours = load_encoder(cls, hf_config, source, torch.float32, device)
    ref = BertModel.from_pretrained(str(tmp_path), dtype=torch.float32, add_pooling_layer=False).to(device).eval()
    seqs = [[2, 50, 60, 70, 3], [2, 9, 3]]
    with torch.inference_mode():
        ids = torch.tensor([t for s in seqs for t in s], device=device)
        positions = torch.tensor([i for s in seqs for i in range(len(s))], device=device)
        hidden = ours(ids, positions, [len(s) for s in seqs])
        start = 0
        for s in seqs:
            expect = ref(torch.tensor([s], device=device)).last_hidden_state[0]
            assert (hidden[start : start + len(s)] - expect).abs().max().item() < 1e-4
            start += len(s)
