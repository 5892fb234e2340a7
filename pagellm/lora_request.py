"""LoRARequest: which PEFT LoRA adapter a request runs with (vLLM's shape)."""

from __future__ import annotations

from dataclasses import dataclass

from pagellm.errors import InvalidRequest


@dataclass(frozen=True)
class LoRARequest:
    """Names a PEFT adapter folder; `lora_int_id` (>= 1) identifies it in the engine and the prefix cache."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidRequest(f"lora_int_id must be an int >= 1; got {self.lora_int_id!r}", param="lora_request")
        if not self.lora_name:
            raise InvalidRequest("lora_name must be non-empty", param="lora_request")
