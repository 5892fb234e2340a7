"""quantization="int8" for encoders (pagellm/model/layers/encoder_int8.py): close to float32, independent of
the batch, and refused where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagellm import LLM
from pagellm.errors import InvalidRequest
from pagellm.model.layers.encoder_int8 import Int8DynamicLinear, int8_available, quantize_linears
from tests.model.test_bert import make_texts, save_tiny_bert_classifier

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch has no fbgemm int8 ops here")

NEWS = ["The central bank raised interest rates by half a point.", "Shares fell 5% after earnings missed estimates.",
        "Regulators fined the lender for misleading customers.", "Markets were quiet ahead of the holiday.",
        "Quarterly profit doubled on strong loan growth.", "Police arrested two men over the bank fraud."]


@pytest.fixture(scope="module")
def float_and_int8() -> tuple[LLM, LLM]:
    return LLM(task="embed", dtype="float32"), LLM(task="embed", dtype="float32", quantization="int8")


def embed(llm: LLM, texts: list[str]) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)])


def test_int8_linear_is_close_to_float_and_per_row():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8DynamicLinear(linear)
    x = torch.randn(40, 64)
    x[3] *= 100.0  # one loud row must not coarsen the others (per-row, not per-tensor, activation scales)
    with torch.inference_mode():
        ref, out = linear(x), q(x)
        alone = q(x[5:6])
    assert F.cosine_similarity(out, ref, dim=-1).min() > 0.999
    assert torch.equal(alone[0], out[5])  # a row's result does not depend on the rest of the call


def test_quantize_linears_swaps_only_the_named_layers():
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(8, 16))
    model.add_module("o_proj", nn.Linear(16, 8))
    assert quantize_linears(model, ("up_proj",)) == 1
    assert isinstance(model.up_proj, Int8DynamicLinear) and type(model.o_proj) is nn.Linear


def test_int8_minilm_embeddings_are_close_to_float32(float_and_int8):
    fp32, int8 = float_and_int8
    texts = NEWS + make_texts(40, max_words=40, seed=3)
    cos = F.cosine_similarity(embed(fp32, texts), embed(int8, texts), dim=-1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.95, (cos.mean(), cos.min())


def test_int8_embedding_barely_depends_on_the_batch(float_and_int8):
    # per-row activation scales: what remains is float32 rounding of the unquantized parts (which differs
    # with the batch's shape) now and then moving an int8 rounding, ~1e-4; one scale per call gave 3e-2
    _, int8 = float_and_int8
    texts = NEWS + make_texts(20, seed=5)
    together = embed(int8, texts)
    one_by_one = torch.cat([embed(int8, [t]) for t in texts])
    torch.testing.assert_close(together, one_by_one, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory) -> str:
    """A 2-layer random BertForSequenceClassification with MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from pagellm.model_source import bundled_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()))
    return save_tiny_bert_classifier(tmp_path_factory.mktemp("tiny_bert_cls_int8"), tokenizer, num_labels=3)


def test_int8_classifier_runs_its_encoder_in_int8(tiny_classifier_dir):
    fp32 = LLM(tiny_classifier_dir, task="classify", dtype="float32")
    int8 = LLM(tiny_classifier_dir, task="classify", dtype="float32", quantization="int8")
    a = torch.tensor([o.outputs.probs for o in fp32.classify(NEWS, use_tqdm=False)])
    b = torch.tensor([o.outputs.probs for o in int8.classify(NEWS, use_tqdm=False)])
    assert (a - b).abs().max() < 0.05 and not torch.equal(a, b)  # int8 did run, and stayed close


def test_int4_pooling_is_refused():
    with pytest.raises(InvalidRequest, match="auto, none, int8"):
        LLM(task="embed", quantization="int4")


def test_int8_pooling_on_a_decoder_is_refused(tiny_llama_dir):
    with pytest.raises(InvalidRequest, match="BERT encoders only"):
        LLM(str(tiny_llama_dir), task="embed", quantization="int8")
