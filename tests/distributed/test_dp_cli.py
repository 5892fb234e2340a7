"""`pagellm serve --data-parallel-size`: clear refusals before anything loads (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys

from pagellm.entrypoints.cli import build_parser

# runs the CLI with `import ray` failing, as on an install without the distributed extra
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from pagellm.entrypoints.cli import main; main(sys.argv[1:])"


def run_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, "serve", *flags], capture_output=True, text=True,
                          timeout=120)


def test_data_parallel_without_ray_says_how_to_install_it() -> None:
    result = run_serve("--data-parallel-size", "2")
    assert result.returncode == 1
    assert "pip install 'pagellm[distributed]'" in result.stderr and "Traceback" not in result.stderr


def test_data_parallel_refuses_the_mp_backend() -> None:
    result = run_serve("--data-parallel-size", "2", "--distributed-executor-backend", "mp")
    assert result.returncode == 1
    assert "use --distributed-executor-backend ray" in result.stderr


def test_serve_flags_default_to_one_engine_without_ray() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.data_parallel_size, args.distributed_executor_backend, args.data_parallel_threads,
            args.data_parallel_routing) == (None, None, 1, "affinity")
