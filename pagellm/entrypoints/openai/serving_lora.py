"""LoRA adapters over HTTP: names -> LoRARequests, `--lora-modules`, and run-time load/unload."""

from __future__ import annotations

import asyncio
import itertools
import json

from fastapi import FastAPI
from starlette.responses import PlainTextResponse, Response

from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.errors import APIError
from pagellm.entrypoints.openai.openapi_docs import errors
from pagellm.entrypoints.openai.protocol import LoadLoRAAdapterRequest, ModelCard, UnloadLoRAAdapterRequest
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest


def parse_lora_modules(specs: list[str] | None) -> list[tuple[str, str]]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}` -> (name, path) pairs."""
    modules = []
    for spec in specs or []:
        if spec.lstrip().startswith("{"):
            try:
                obj = json.loads(spec)
                modules.append((str(obj["name"]), str(obj["path"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"--lora-modules: bad JSON {spec!r} (needs name and path)") from exc
        elif "=" in spec:
            name, path = spec.split("=", 1)
            modules.append((name.strip(), path.strip()))
        else:
            raise ValueError(f"--lora-modules takes name=path; got {spec!r}")
    return modules


class LoRAModels:
    """Owns the served adapter names; a request's `model` picks the base model or one adapter."""

    def __init__(self, engine: AsyncLLM, base_names: list[str]) -> None:
        self.engine = engine
        self.base_names = base_names
        self.by_name: dict[str, LoRARequest] = {}
        self.tasks: dict[str, dict | None] = {}  # pagellm_task.json of each adapter (labels of a classifier)
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.engine.model_info().lora_enabled

    async def load(self, name: str, path: str) -> LoRARequest:
        if not self.enabled:
            raise InvalidRequest("LoRA is not enabled on this server: start it with --enable-lora or "
                                 "--lora-modules", param="lora_name")
        if not name or not path:
            raise InvalidRequest("both lora_name and lora_path are required", param="lora_name")
        async with self._lock:
            if name in self.by_name or name in self.base_names:
                raise InvalidRequest(f"The lora adapter {name!r} has already been loaded.", param="lora_name")
            lora = LoRARequest(name, next(self._ids), path)
            # reads and checks the files; the task names a classifier's labels
            self.tasks[name] = await self.engine.add_lora(lora)
            self.by_name[name] = lora
            return lora

    async def unload(self, name: str) -> None:
        async with self._lock:
            lora = self.by_name.get(name)
            if lora is None:
                raise APIError(404, f"The lora adapter {name!r} cannot be found.", param="lora_name",
                               code="lora_not_found")
            await self.engine.remove_lora(lora.lora_int_id)
            del self.by_name[name]
            self.tasks.pop(name, None)

    def cards(self, max_model_len: int) -> list[ModelCard]:
        return [ModelCard(id=name, root=lora.lora_path, parent=self.base_names[0], max_model_len=max_model_len)
                for name, lora in self.by_name.items()]


def add_lora_routes(app: FastAPI, loras: LoRAModels) -> None:
    """vLLM's run-time adapter routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=errors(400, 503))
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
        await loras.load(req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=errors(400, 404, 503))
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
        await loras.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
