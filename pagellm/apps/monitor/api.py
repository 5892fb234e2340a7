"""The monitor's HTTP surface: a FastAPI router (ingest, topics, series, alerts, metrics) and the dashboard.

`monitor_router(service)` mounts beside the OpenAI routes of `pagellm serve`; `build_monitor_app(service)` is
the standalone app of `pagellm monitor serve` (router + the static dashboard at /).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from pagellm.apps.monitor.service import MonitorService, parse_item
from pagellm.apps.web import mount_page
from pagellm.entrypoints.openai.errors import APIError, install_error_handlers
from pagellm.errors import InvalidRequest

STATIC_DIR = Path(__file__).parent / "static"
MAX_ITEMS = 1000  # per ingest request


class IngestRequest(BaseModel):
    """POST /v1/monitor/ingest: `texts` are strings or {"text", "id"?, "time"?} objects."""

    model_config = ConfigDict(extra="forbid")
    texts: list[Any]


def monitor_router(service: MonitorService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/monitor/ingest")
    async def ingest(request: IngestRequest) -> dict[str, Any]:
        if not request.texts:
            raise APIError(400, "texts is empty", param="texts")
        if len(request.texts) > MAX_ITEMS:
            raise APIError(400, f"at most {MAX_ITEMS} texts per request; got {len(request.texts)}", param="texts")
        items = []
        for i, obj in enumerate(request.texts):
            try:
                items.append(parse_item(obj))
            except InvalidRequest as exc:
                service.metrics.bad_inputs.inc()
                raise APIError(400, f"texts[{i}]: {exc.message}", param=f"texts[{i}].{exc.param or 'text'}") from exc
        # NOTE: classification runs on a worker thread; the event loop keeps serving /metrics and the page
        report = await asyncio.to_thread(service.ingest, items, None, None)
        return {"classified": report.num_classified, "duplicates": report.num_duplicates,
                "alerts": [a.to_json() for a in report.alerts]}

    @router.get("/v1/monitor/topics")
    async def topics() -> dict[str, Any]:
        return {"topics": service.topics_view(), "texts": service.store.count()}

    @router.get("/v1/monitor/series")
    async def series(bucket: int = Query(100, ge=1, le=100_000)) -> dict[str, Any]:
        return {"bucket": bucket, "points": await asyncio.to_thread(service.store.series, bucket)}

    @router.get("/v1/monitor/alerts")
    async def alerts(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        return {"alerts": await asyncio.to_thread(service.alerts_view, limit)}

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return router


def build_monitor_app(service: MonitorService) -> FastAPI:
    app = FastAPI(title="pagellm monitor")
    install_error_handlers(app)
    app.include_router(monitor_router(service))
    mount_page(app, STATIC_DIR)
    return app
