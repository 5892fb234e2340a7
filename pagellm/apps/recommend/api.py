"""The recommender's HTTP surface: `POST /v1/recommend` (by user id, or by a history of item titles for a new
user), `GET /v1/recommend/health`. `recommend_router(service)` mounts beside other routes;
`build_recommend_app(service)` is the app of `pagellm recommend serve`."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict

from pagellm.apps.recommend.service import RecommendService, UnknownUser
from pagellm.entrypoints.openai.errors import APIError, install_error_handlers
from pagellm.errors import InvalidRequest


class RecommendRequest(BaseModel):
    """Either `user_id` or `history`; `candidates` (item ids or `Title (year)`) limit what is ranked."""

    model_config = ConfigDict(extra="forbid")
    user_id: str | int | None = None
    history: list[str] | None = None
    candidates: list[str | int] | None = None
    exclude_seen: bool = True
    k: int = 10
    # NOTE: fast by default: full adds 100 cross-scorer pairs, ~1-6 s on the 2 shared cores (docs/recommend.md)
    mode: Literal["fast", "full"] = "fast"


def recommend_router(service: RecommendService) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/recommend")
    async def recommend(request: RecommendRequest) -> dict[str, Any]:
        user_id = None if request.user_id is None else str(request.user_id)
        candidates = None if request.candidates is None else [str(c) for c in request.candidates]
        try:
            # NOTE: scoring runs on a worker thread: the event loop keeps answering other requests
            return await asyncio.to_thread(service.recommend, user_id, request.history, candidates,
                                           request.exclude_seen, request.k, request.mode)
        except UnknownUser as exc:
            raise APIError(404, exc.message, param=exc.param, code="user_not_found") from exc
        except InvalidRequest as exc:
            raise APIError(400, exc.message, param=exc.param) from exc

    @router.get("/v1/recommend/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "users": service.num_users, "items": len(service.data.items),
                "modes": ["fast", "full"] if service.cross is not None else ["fast"]}

    return router


def build_recommend_app(service: RecommendService) -> FastAPI:
    app = FastAPI(title="pagellm recommend")
    install_error_handlers(app)
    app.include_router(recommend_router(service))
    return app
