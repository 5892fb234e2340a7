"""pagellm: a paged-KV-cache LLM engine, CPU first."""

from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.pooling_params import PoolingParams
from pagellm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "PoolingParams", "SamplingParams", "InvalidRequest", "__version__"]


def __getattr__(name: str):
    # NOTE: LLM pulls in torch; importing it lazily keeps `import pagellm` (and the CLI's --help) fast.
    if name == "LLM":
        from pagellm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
