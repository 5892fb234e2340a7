"""lm-evaluation-harness (local-completions) against the server on a local multiple-choice task.

Its loglikelihood path sends token-id prompts with echo=true, logprobs=1, max_tokens=1, and it
tokenizes through the server's /tokenize, /detokenize and /tokenizer_info. Needs the `eval` extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.entrypoints.server_utils import RunningServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_lm_eval_local_completions_on_the_bundled_model(bundled_server: RunningServer, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    model = bundled_server.engine.model_name
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions",
        "--model_args", f"model={model},base_url={bundled_server.v1}/completions,num_concurrent=2,max_retries=1,"
                        "tokenized_requests=True,tokenizer_backend=remote",
        "--batch_size", "16", "--include_path", "benchmarks/lm_eval_task", "--tasks", "pagellm_gk",
        "--output_path", str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = tmp_path.rglob("results_*.json")
    metrics = json.loads(result_file.read_text())["results"]["pagellm_gk"]
    # 4 choices: chance is 0.25; SmolLM2-135M-Instruct scores about 0.69 (docs/serving.md)
    assert metrics["acc,none"] >= 0.5, metrics
    assert metrics["acc_norm,none"] >= 0.5, metrics
