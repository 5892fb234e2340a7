"""Soak: mixed load on `pagellm serve` (bundled model) for a fixed time; RSS sampled every 10 s.

The load, from a few client workers on 127.0.0.1: completions and chat, streaming and not; streams the
client drops mid-way and requests it gives up on before the answer; bad requests (invalid JSON, unknown
role and model, a prompt past the context window, out-of-range parameters); a LoRA adapter loaded, used and
unloaded in a loop; and /v1/embeddings on a second server (`--task embed`, the bundled MiniLM), since the
generate server answers /v1/embeddings with a 400 naming the task it needs (also sent, as a bad request).

Every request ends in exactly one outcome: ok (2xx, complete: a stream ends with [DONE]), 4xx, 503,
cancelled (by this client, on purpose), 5xx, or lost (anything else: a reset, a timeout, a stream cut short).
Targets: 0 5xx, 0 lost, RSS flat within 10% over the last 10 minutes.

    python benchmarks/soak.py --duration 1200 --out docs/results/soak.json   # writes soak.json and soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a cat dog sat on mat river city light house story about small large quiet storm".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident set of pid and its children (the server is one process; children would count)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def lscpu_flags() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    return {"model_name": info.get("Model name"), "cpus": info.get("CPU(s)"), "flags": info.get("Flags", "").split()}


def make_lora_adapter(out_dir: Path) -> Path:
    """A random rank-8 PEFT LoRA on SmolLM2-135M's shapes (B non-zero, so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import smollm2_135m_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_135m_config(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    model.save_pretrained(str(out_dir))
    return out_dir


class Server:
    """`pagellm serve` in a child process on a free loopback port."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("server did not start")

    def wait_idle(self, timeout: float = 300) -> bool:
        """Wait until no request runs or waits (so a SIGTERM is not also a test of aborting work)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"{self.base}/metrics", timeout=10).text
            except httpx.HTTPError:
                return False
            busy = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))
            if busy == 0:
                return True
            time.sleep(1)
        return False

    def stop(self) -> int | None:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


class Load:
    """The client side: workers pick a request kind at random until the deadline; outcomes are counted."""

    def __init__(self, gen: str, embed: str | None, model: str, lora_path: Path | None, seed: int) -> None:
        self.gen, self.embed, self.model, self.lora_path = gen, embed, model, lora_path
        self.rng = random.Random(seed)
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, outcome) -> count
        self.lost: list[str] = []  # what each lost request saw (first 50)
        self.server_errors: list[str] = []
        self.lora_loaded = False
        self.lora_lock = asyncio.Lock()

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randrange(lo, hi)))

    def record(self, kind: str, outcome: str, detail: str = "") -> None:
        self.outcomes[(kind, outcome)] += 1
        if outcome == "lost" and len(self.lost) < 50:
            self.lost.append(f"{kind}: {detail}")
        if outcome == "5xx" and len(self.server_errors) < 50:
            self.server_errors.append(f"{kind}: {detail}")

    def classify(self, kind: str, status: int, body: str = "") -> str:
        if 200 <= status < 300:
            outcome = "ok"
        elif status == 503:
            outcome = "503"
        elif 400 <= status < 500:
            outcome = "4xx"
        elif status >= 500:
            outcome = "5xx"
        else:
            outcome = "lost"
        self.record(kind, outcome, f"{status} {body[:200]}")
        return outcome

    async def post(self, client: httpx.AsyncClient, kind: str, url: str, **kw) -> None:
        try:
            resp = await client.post(url, **kw)
        except httpx.HTTPError as exc:
            self.record(kind, "lost", repr(exc))
            return
        self.classify(kind, resp.status_code, resp.text)

    async def stream(self, client: httpx.AsyncClient, kind: str, url: str, body: dict, drop_after: int | None) -> None:
        try:
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    self.classify(kind, resp.status_code, (await resp.aread()).decode(errors="replace"))
                    return
                num_events, done = 0, False
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    if '"error"' in line[:20]:
                        self.record(kind, "5xx" if '"code": 5' in line or '"code":5' in line else "lost", line[:200])
                        return
                    num_events += 1
                    if drop_after is not None and num_events >= drop_after:
                        break  # leaving the block closes the connection mid-stream
                if done:
                    self.record(kind, "ok")
                elif drop_after is not None and num_events >= drop_after:
                    self.record(kind, "cancelled")
                else:
                    self.record(kind, "lost", f"stream ended after {num_events} events without [DONE]")
        except httpx.HTTPError as exc:
            self.record(kind, "lost", repr(exc))

    async def give_up(self, client: httpx.AsyncClient, kind: str, url: str, body: dict) -> None:
        """A non-streaming request the client abandons after a short wait."""
        try:
            resp = await asyncio.wait_for(client.post(url, json=body), timeout=self.rng.uniform(0.2, 1.5))
        except asyncio.TimeoutError:
            self.record(kind, "cancelled")
            return
        except httpx.HTTPError as exc:
            self.record(kind, "lost", repr(exc))
            return
        self.classify(kind, resp.status_code, resp.text)

    async def one(self, client: httpx.AsyncClient) -> None:
        r = self.rng.random()
        comp, chat = f"{self.gen}/v1/completions", f"{self.gen}/v1/chat/completions"
        max_tokens = self.rng.randrange(4, 32)
        prompt = self.text(5, 200)
        messages = [{"role": "user", "content": self.text(5, 120)}]
        if r < 0.14:
            await self.post(client, "completion", comp,
                            json={"model": self.model, "prompt": prompt, "max_tokens": max_tokens})
        elif r < 0.28:
            await self.stream(client, "completion_stream", comp,
                              {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                               "logprobs": 2}, None)
        elif r < 0.40:
            await self.post(client, "chat", chat, json={"model": self.model, "messages": messages,
                                                        "max_tokens": max_tokens, "logprobs": True,
                                                        "top_logprobs": 2})
        elif r < 0.52:
            await self.stream(client, "chat_stream", chat, {"model": self.model, "messages": messages,
                                                            "max_tokens": max_tokens, "stream": True}, None)
        elif r < 0.66:
            await self.stream(client, "dropped_stream", comp,
                              {"model": self.model, "prompt": prompt, "max_tokens": 128, "stream": True,
                               "ignore_eos": True}, self.rng.randrange(1, 12))
        elif r < 0.72:
            await self.give_up(client, "abandoned", chat, {"model": self.model, "messages": messages,
                                                           "max_tokens": 200, "ignore_eos": True})
        elif r < 0.84:
            await self.bad_request(client)
        elif r < 0.92 and self.embed:
            inputs = [self.text(3, 60) for _ in range(self.rng.randrange(1, 8))]
            await self.post(client, "embedding", f"{self.embed}/v1/embeddings",
                            json={"model": "embed", "input": inputs})
        elif self.lora_path is not None:
            await self.lora(client)
        else:
            await self.post(client, "completion", comp,
                            json={"model": self.model, "prompt": prompt, "max_tokens": max_tokens})

    async def bad_request(self, client: httpx.AsyncClient) -> None:
        comp, chat = f"{self.gen}/v1/completions", f"{self.gen}/v1/chat/completions"
        case = self.rng.randrange(7)
        if case == 0:
            await self.post(client, "bad", comp, content=b'{"prompt": "unterminated', headers={"content-type":
                                                                                                "application/json"})
        elif case == 1:
            await self.post(client, "bad", chat, json={"model": self.model,
                                                       "messages": [{"role": "wizard", "content": "hi"}]})
        elif case == 2:
            await self.post(client, "bad", comp, json={"model": "no-such-model", "prompt": "hi"})
        elif case == 3:
            await self.post(client, "bad", comp, json={"model": self.model, "prompt": "word " * 3000,
                                                       "max_tokens": 4})
        elif case == 4:
            await self.post(client, "bad", comp, json={"model": self.model, "prompt": "hi", "temperature": -1})
        elif case == 5:
            await self.post(client, "bad", f"{self.gen}/v1/embeddings", json={"model": self.model, "input": "hi"})
        else:
            await self.post(client, "bad", comp, content=b"\xff\xfe not utf-8",
                            headers={"content-type": "application/json"})

    async def lora(self, client: httpx.AsyncClient) -> None:
        """Load the adapter if absent, use it, and now and then unload it (refused while in use: a 4xx)."""
        async with self.lora_lock:
            if not self.lora_loaded:
                await self.post(client, "lora_load", f"{self.gen}/v1/load_lora_adapter",
                                json={"lora_name": "soak-lora", "lora_path": str(self.lora_path)})
                self.lora_loaded = True
        await self.post(client, "lora_completion", f"{self.gen}/v1/completions",
                        json={"model": "soak-lora", "prompt": self.text(5, 60), "max_tokens": 16})
        if self.rng.random() < 0.3:
            async with self.lora_lock:
                if self.lora_loaded:
                    before = self.outcomes[("lora_unload", "ok")]
                    await self.post(client, "lora_unload", f"{self.gen}/v1/unload_lora_adapter",
                                    json={"lora_name": "soak-lora"})
                    self.lora_loaded = self.outcomes[("lora_unload", "ok")] == before

    async def worker(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
            while time.monotonic() < deadline:
                try:
                    await self.one(client)
                except asyncio.CancelledError:
                    # The run's hard stop (--grace after the deadline): this client gives up on its request.
                    self.record("in_flight_at_stop", "cancelled")
                    raise


def sample_rss(pids: dict[str, int], started: float) -> dict:
    return {"t_s": round(time.monotonic() - started, 1)} | {name: rss_mb(pid) for name, pid in pids.items()}


async def run_load(load: Load, args: argparse.Namespace, pids: dict[str, int], samples: list[dict]) -> None:
    started = time.monotonic()
    deadline = started + args.duration

    async def sampler() -> None:
        while time.monotonic() < deadline:
            samples.append(sample_rss(pids, started))
            print(json.dumps(samples[-1] | {"requests": sum(load.outcomes.values())}), flush=True)
            await asyncio.sleep(args.sample_every)
        samples.append(sample_rss(pids, started))

    workers = asyncio.gather(*[load.worker(deadline) for _ in range(args.concurrency)])
    sampling = asyncio.ensure_future(sampler())
    try:
        await asyncio.wait_for(workers, timeout=args.duration + args.grace)
    except asyncio.TimeoutError:
        pass  # requests still running at the hard stop were cancelled and counted
    await sampling


def summarize(samples: list[dict], name: str, window_s: float) -> dict:
    values = [(s["t_s"], s[name]) for s in samples if s.get(name) is not None]
    end = values[-1][0]
    window = [v for t, v in values if t >= end - window_s]
    lo, hi = min(window), max(window)
    return {"first_mb": values[0][1], "max_mb": max(v for _, v in values), "last_mb": values[-1][1],
            "window_s": window_s, "window_min_mb": lo, "window_max_mb": hi,
            "window_growth_pct": round(100 * (hi - lo) / lo, 1), "flat_within_10pct": (hi - lo) / lo <= 0.10}


def plot(samples: list[dict], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        pts = [(s["t_s"] / 60, s[name]) for s in samples if s.get(name) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{name} server RSS")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1200, help="seconds of load (default: %(default)s)")
    p.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period in seconds")
    p.add_argument("--concurrency", type=int, default=6, help="client workers (default: %(default)s)")
    p.add_argument("--grace", type=float, default=120,
                   help="seconds requests in flight at the end may still take before the client cancels them")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--no-embed", action="store_true", help="no embedding server")
    p.add_argument("--no-lora", action="store_true", help="no LoRA adapter")
    p.add_argument("--server-arg", action="append", default=[], help="extra `pagellm serve` flag (repeatable)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "soak.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pagellm-soak-"))
    lora_path = None if args.no_lora else make_lora_adapter(tmp / "lora")
    gen_args = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
                "--served-model-name", "soak", *args.server_arg]
    if lora_path is not None:
        gen_args += ["--enable-lora", "--max-lora-rank", "8"]
    servers = {"generate": Server(gen_args, tmp / "generate.log")}
    if not args.no_embed:
        servers["embed"] = Server(["--task", "embed", "--served-model-name", "embed"], tmp / "embed.log")
    samples: list[dict] = []
    load = Load(servers["generate"].base, servers["embed"].base if "embed" in servers else None, "soak",
                lora_path, args.seed)
    exit_codes: dict[str, int | None] = {}
    try:
        for server in servers.values():
            server.wait_ready()
        pids = {name: s.proc.pid for name, s in servers.items()}
        t0 = time.time()
        asyncio.run(run_load(load, args, pids, samples))
        wall = time.time() - t0
        health = {name: httpx.get(f"{s.base}/health", timeout=10).status_code for name, s in servers.items()}
        idle = {name: s.wait_idle() for name, s in servers.items()}
    finally:
        for name, server in servers.items():
            exit_codes[name] = server.stop()
    window = min(600.0, args.duration / 2)
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(load.outcomes.items()):
        by_kind.setdefault(kind, {})[outcome] = n
    totals = Counter()
    for (_, outcome), n in load.outcomes.items():
        totals[outcome] += n
    result = {
        "duration_s": args.duration, "wall_s": round(wall, 1), "concurrency": args.concurrency,
        "server_args": gen_args, "embedding_server": not args.no_embed, "lora": lora_path is not None,
        "requests": sum(load.outcomes.values()), "outcomes": dict(totals), "by_kind": by_kind,
        "num_5xx": totals["5xx"], "num_lost": totals["lost"], "lost_examples": load.lost,
        "server_errors": load.server_errors, "health_after": health, "idle_before_stop": idle,
        "server_exit_codes": exit_codes,
        "rss": {name: summarize(samples, name, window) for name in servers},
        "rss_samples": samples, "cpu": lscpu_flags(), "load_avg": os.getloadavg(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out.write_text(json.dumps(result, indent=1))
    plot(samples, list(servers), out.with_suffix(".png"),
         f"pagellm soak: {result['requests']} requests in {args.duration / 60:.0f} min, "
         f"{totals['5xx']} 5xx, {totals['lost']} lost")
    summary = {k: v for k, v in result.items() if k not in ("rss_samples", "cpu")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
