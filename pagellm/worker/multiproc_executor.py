"""MultiprocExecutor: the Worker surface over tensor-parallel ranks, one spawned process each.

The engine keeps its one scheduler and calls this object as it would a Worker. Each call is sent to every
rank (a pickled message on its pipe); each rank holds a Worker over its shard of the model
(model/parallel.py) and the ranks meet in torch.distributed collectives inside the forward. Rank 0 samples
and its ModelRunnerOutput comes back; the other ranks run the same forward without sampling and answer with
an acknowledgement, so an error on any rank reaches the engine.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import traceback
import weakref
from dataclasses import replace
from datetime import timedelta
from multiprocessing import connection, get_context

import torch

from pagellm.config import CacheConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagellm.core.sched_output import SchedulerOutput
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.model.loader.hf_loader import load_hf_config
from pagellm.model.parallel import TensorParallelGroup, check_shardable
from pagellm.model_source import resolve_model
from pagellm.outputs import ModelRunnerOutput
from pagellm.worker.worker import GENERATE_TASK, AdapterInfo, ModelInfo, PoolingBatch, Worker, pick_device

logger = logging.getLogger(__name__)

# A collective that waits longer than this for another rank fails (the rank then reports the error).
COLLECTIVE_TIMEOUT = timedelta(seconds=float(os.environ.get("PAGELLM_TP_TIMEOUT", "300")))


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor:
    """Owns the tensor-parallel worker processes; answers the engine as one Worker would."""

    def __init__(self, model_config: ModelConfig, task: str, lora_config: LoRAConfig | None,
                 parallel_config: ParallelConfig) -> None:
        world = parallel_config.tensor_parallel_size
        _check_supported(model_config, task, lora_config, parallel_config)
        device = pick_device(model_config, None)
        if device.type == "cuda":
            if torch.cuda.device_count() < world:
                raise InvalidRequest(f"tensor_parallel_size {world} needs {world} CUDA devices; "
                                     f"{torch.cuda.device_count()} found", param="tensor_parallel_size")
            backend, threads = "nccl", 1
        else:
            cores = available_cores()
            if world > cores:
                raise InvalidRequest(f"tensor_parallel_size {world} is larger than the {cores} CPU cores this "
                                     "process may use: each rank needs a core of its own", param="tensor_parallel_size")
            backend, threads = "gloo", cores // world
        self.model_config, self.task, self.lora_config = model_config, task, None
        self.world_size, self.backend, self.threads_per_rank = world, backend, threads
        self.info: ModelInfo | None = None
        self._error: str | None = None
        ctx = get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        level = logging.getLogger("pagellm").getEffectiveLevel()
        self._conns: list[connection.Connection] = []
        self._procs = []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, name=f"pagellm-tp{rank}", daemon=True,
                               args=(rank, world, init_method, backend, threads, model_config, task, level, child))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns)
        logger.info("tensor parallel: %d ranks on %s (%s), %d thread(s) each", world, device.type, backend, threads)

    # ---- the Worker surface -----------------------------------------------------------------------
    is_pooling = False
    lora_enabled = False
    max_fused_rows = None  # NOTE: the fused C++ decode stack has no all-reduce between layers: eager layers only

    def load(self) -> ModelInfo:
        self.info = self._call("load")[0]
        return self.info

    def num_kv_blocks(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> int:
        """Every rank holds the same blocks (of its own KV heads): the fewest any rank's memory allows."""
        return min(self._call("num_kv_blocks", cache_config, scheduler_config))

    def init_kv_cache(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
        self._call("init_kv_cache", cache_config, scheduler_config)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # NOTE: ranks other than 0 do not sample: they need no token history (penalties, prompt logprobs)
        # and no grammar bitmask, so they get a lighter message
        light = replace(scheduler_output, grammar_bitmask=None, grammar_req_ids=[],
                        scheduled=[replace(s, all_token_ids=[]) for s in scheduler_output.scheduled])
        if scheduler_output.grammar_bitmask is not None:  # NOTE: a view pickles its whole storage: send its rows
            scheduler_output = replace(scheduler_output, grammar_bitmask=scheduler_output.grammar_bitmask.clone())
        payloads = [pickle.dumps(("execute", (scheduler_output,)), protocol=pickle.HIGHEST_PROTOCOL)]
        if self.world_size > 1:
            payloads.append(pickle.dumps(("execute", (light,)), protocol=pickle.HIGHEST_PROTOCOL))
        return self._send([payloads[min(rank, 1)] for rank in range(self.world_size)])[0]

    def release(self, req_ids: list[str]) -> None:
        if req_ids:
            self._call("release", req_ids)

    def add_adapter(self, lora_request: LoRARequest) -> AdapterInfo:
        raise InvalidRequest("LoRA adapters are not supported with tensor_parallel_size > 1 yet",
                             param="lora_request")

    def remove_adapter(self, lora_id: int) -> bool:
        return False

    def pool(self, batch: PoolingBatch) -> list[list[float]]:
        raise InvalidRequest("embed and classify are not supported with tensor_parallel_size > 1",
                             param="tensor_parallel_size")

    def close(self) -> None:
        """Stop the worker processes (also done when this object is collected, and at exit)."""
        self._finalizer()

    # ---- messaging ---------------------------------------------------------------------------------
    def _call(self, method: str, *args) -> list:
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        return self._send([data] * self.world_size)

    def _send(self, payloads: list[bytes]) -> list:
        """Send each rank its message; every rank's result, in rank order."""
        if self._error is not None:
            raise RuntimeError(f"the tensor-parallel workers stopped after an error: {self._error}")
        try:
            for conn, data in zip(self._conns, payloads):
                conn.send_bytes(data)
        except OSError as exc:
            self._fail(f"a rank's pipe is closed ({exc})")
        results: list = [None] * self.world_size
        pending = dict(zip(self._conns, range(self.world_size)))
        while pending:
            # NOTE: whichever rank answers first: a rank that failed answers while the others may still wait in a
            # collective for it, so the failure is seen now rather than after the collective's timeout
            for conn in connection.wait(list(pending)):
                rank = pending.pop(conn)
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    self._fail(f"rank {rank} exited (exit code {self._procs[rank].exitcode})")
                if status == "invalid":
                    self._fail(value[0], InvalidRequest(*value))
                if status == "error":
                    self._fail(f"rank {rank}: {value}")
                results[rank] = value
        return results

    def _fail(self, message: str, exc: Exception | None = None):
        self._error = message
        self._finalizer()
        raise exc if exc is not None else RuntimeError(f"tensor parallel: {message}")


def _check_supported(model_config: ModelConfig, task: str, lora_config: LoRAConfig | None,
                     parallel_config: ParallelConfig) -> None:
    world = parallel_config.tensor_parallel_size
    if parallel_config.backend == "ray":
        raise InvalidRequest("distributed_executor_backend 'ray' is not supported for tensor parallelism yet; "
                             "use 'mp' (worker processes on this machine)", param="distributed_executor_backend")
    if task != GENERATE_TASK:
        raise InvalidRequest(f"tensor_parallel_size > 1 supports task 'generate' only; got {task!r}",
                             param="tensor_parallel_size")
    if lora_config is not None:
        raise InvalidRequest("LoRA adapters are not supported with tensor_parallel_size > 1 yet", param="enable_lora")
    if model_config.compile:
        raise InvalidRequest("--compile is not supported with tensor_parallel_size > 1 yet", param="compile")
    source = resolve_model(model_config.model)
    if source.format == "hf":  # NOTE: a GGUF's config needs its metadata parsed: the ranks check it at load
        check_shardable(load_hf_config(source.path), world)


def _shutdown(procs, conns) -> None:
    message = pickle.dumps(("close", ()))
    for proc, conn in zip(procs, conns):
        if proc.is_alive():
            try:
                conn.send_bytes(message)
            except OSError:
                pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()


def _describe(exc: BaseException) -> tuple[str, object]:
    if isinstance(exc, InvalidRequest):
        return "invalid", (exc.message, exc.param)
    return "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


def _rank_main(rank: int, world: int, init_method: str, backend: str, threads: int, model_config: ModelConfig,
               task: str, log_level: int, conn: connection.Connection) -> None:
    """A rank's process: join the group, hold a Worker over this rank's shard, answer the driver's calls."""
    import torch.distributed as dist

    logging.basicConfig(format=f"%(asctime)s tp{rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pagellm").setLevel(log_level)
    torch.set_num_threads(threads)
    worker, init_error = None, None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        worker = Worker(model_config, task, None, TensorParallelGroup(rank, world))
    except Exception as exc:  # noqa: BLE001 - the answer to the driver's first call
        init_error = _describe(exc)
    try:
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the driver is gone
                break
            if method == "close":
                break
            try:
                if init_error is not None:
                    result = init_error
                elif method == "execute":
                    out = worker.runner.execute(args[0], sample=rank == 0)
                    result = ("ok", out if rank == 0 else None)
                else:
                    result = ("ok", getattr(worker, method)(*args))
            except Exception as exc:  # noqa: BLE001 - the driver reports it
                result = _describe(exc)
            conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
