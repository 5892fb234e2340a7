"""Layering: pagellm.core is pure Python and must import with torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH_AND_IMPORT_CORE = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"pagellm.core must not import torch (tried {name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    import pagellm.core.block_pool
    import pagellm.core.kv_cache_manager
    import pagellm.core.sched_output
    import pagellm.core.scheduler
    from pagellm.config import CacheConfig, SchedulerConfig

    # Build and run one step too, so lazy imports inside methods are covered.
    from pagellm.request import Request
    from pagellm.sampling_params import SamplingParams
    sched = pagellm.core.scheduler.Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=8))
    sched.add_request(Request("a", [1, 2, 3], SamplingParams()))
    assert sched.schedule().total_num_scheduled_tokens == 3
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, leaked
    print("ok")
    """
)


def test_core_imports_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH_AND_IMPORT_CORE],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# Each package may import only the layers below it (DESIGN.md): types <- core | model <- worker <- engine
# <- entrypoints <- apps. "types" are pagellm's top-level modules (config, sampling_params, tokenizer, ...).
FORBIDDEN = {
    "types": {"core", "model", "worker", "engine", "entrypoints", "apps", "adapt"},
    "core": {"model", "worker", "engine", "entrypoints", "apps", "adapt"},
    "model": {"core", "worker", "engine", "entrypoints", "apps"},
    "worker": {"engine", "entrypoints", "apps", "adapt"},
    "engine": {"model", "entrypoints", "apps", "adapt"},  # the worker owns the model
    "apps": {"core", "model", "worker", "engine"},  # the public surface only
}
PACKAGES = ("core", "model", "worker", "engine", "entrypoints", "apps", "adapt", "structured_output")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pagellm" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in PACKAGES else "types"


def _imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_package_imports_a_layer_above_it() -> None:
    package = REPO_ROOT / "pagellm"
    violations = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        layer = _layer(module)
        for imported in _imports(path):
            if _layer(imported) in FORBIDDEN.get(layer, ()):
                violations.append(f"{module} ({layer}) imports {imported}")
    assert not violations, "\n".join(violations)


def test_no_layer_reaches_through_another() -> None:
    """The engine's internals are reached only inside pagellm/engine; the server uses AsyncLLM's methods."""
    import re

    pattern = re.compile(r"\.engine\.engine\b|\.core\.runner\b|\.core\.scheduler\b|\.call\(|\._engine\b")
    hits = []
    for path in sorted((REPO_ROOT / "pagellm").rglob("*.py")):
        if path.parent.name == "engine":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
