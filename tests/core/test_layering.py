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
