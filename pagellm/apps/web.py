"""What every application's FastAPI app and PostgreSQL store share: its page, and one serialized connection."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles


def mount_page(app: FastAPI, static_dir: Path) -> None:
    """Serve an app's static/ folder at /static and its index.html at / (plain files: no build step, no CDN)."""
    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html")


def open_postgres(uri: str, schema: str) -> tuple[Any, threading.Lock]:
    """An autocommit psycopg connection with `schema` applied, and the lock that serializes its use."""
    import psycopg

    db = psycopg.connect(uri, autocommit=True)
    lock = threading.Lock()
    with lock:
        db.execute(schema)
    return db, lock
