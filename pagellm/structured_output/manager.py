"""StructuredOutputManager: xgrammar grammars compiled off the engine loop, and one matcher per request.

The engine owns one manager. ``validate`` turns a spec into an xgrammar ``Grammar`` (a parse, ~1 ms;
bad input raises ``InvalidRequest`` naming the field); ``grammar_for`` returns a future of the compiled
grammar from a small thread pool, cached by the spec's (kind, canonical text), so a repeated schema
costs a dict lookup. A request holds a ``GrammarState`` that becomes ready when its future is done.
xgrammar (and the tokenizer info it needs) load on the first constrained request, not at start-up.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from typing import Any

from pagellm.errors import InvalidRequest
from pagellm.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest is the message.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
_NUM_COMPILE_THREADS = 2
# NOTE: "any whitespace" is capped at this many characters between two JSON tokens: unbounded, a weak
# model can emit whitespace until max_tokens and never close the object; 8 still allows a newline and
# 2-space indentation 3 levels deep (deeper lines are indented less, the JSON is the same).
MAX_WHITESPACE = 8
_CACHE_SIZE = 512  # compiled grammars kept (a JSON schema's is tens of KB)
# Whitespace strings that tell a whitespace_pattern allowing whitespace from one allowing none.
_WHITESPACE_PROBES = (" ", "  ", "\n", "\t", "\r\n")


def _clean(exc: BaseException) -> str:
    return _CPP_PREFIX.sub("", str(exc)).strip()


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar's TokenizerInfo from pagellm's tokenizer (LiteTokenizer or a transformers one).

    NOTE: LiteTokenizer wraps a `tokenizers.Tokenizer`, which serializes to the same JSON that
    xgrammar reads from an HF fast tokenizer's backend: the vocabulary by id plus the decoder
    metadata (byte-level, byte-fallback or raw; prefix space) give the same info, with no transformers.
    """
    import xgrammar as xgr

    backend = getattr(tokenizer, "_backend", None)
    if backend is None:  # a transformers tokenizer: xgrammar's own detection
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    encoded_vocab = [""] * vocab_size
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if index < vocab_size:
            encoded_vocab[index] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(encoded_vocab, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stop_token_ids, add_prefix_space=metadata["add_prefix_space"])


def _is_compact(pattern: str | None) -> bool | None:
    """None: any whitespace (unset); True: no whitespace. Other patterns are refused."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise InvalidRequest(f"structured_outputs.whitespace_pattern is not a valid regex: {exc}",
                             param="structured_outputs.whitespace_pattern") from exc
    if compiled.fullmatch("") and not any(compiled.fullmatch(s) for s in _WHITESPACE_PROBES):
        return True
    raise InvalidRequest(
        "structured_outputs.whitespace_pattern: the xgrammar backend supports only a pattern matching the empty "
        "string (compact JSON), or no pattern (any whitespace)", param="structured_outputs.whitespace_pattern")


def _choice_ebnf(choices: list[str]) -> str:
    # NOTE: json.dumps gives a double-quoted string with escapes that xgrammar's EBNF reads the same way
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarState:
    """One request's grammar: pending until compiled, then a matcher advanced by every accepted token.

    Duck-typed by the scheduler (core never imports xgrammar): ``is_ready``, ``accept_token``,
    ``is_terminated``. Recompute preemption keeps a request's tokens, so the matcher stays in step.
    """

    def __init__(self, future: concurrent.futures.Future, kind: str) -> None:
        self.future = future
        self.kind = kind
        self.matcher = None
        self.num_rejected = 0

    def is_ready(self) -> bool:
        if self.matcher is None and self.future.done() and self.future.exception() is None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.future.result())
        return self.matcher is not None

    def has_failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None

    def accept_token(self, token_id: int) -> bool:
        assert self.matcher is not None, "a token was sampled before the grammar was ready"
        if self.matcher.is_terminated():
            return False
        accepted = self.matcher.accept_token(token_id)
        if not accepted:  # only when the mask was bypassed (e.g. min_tokens masked every allowed token)
            self.num_rejected += 1
            logger.warning("grammar rejected token %d", token_id)
        return accepted

    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

    def fill_bitmask(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def num_valid(self, token_ids: list[int]) -> int:
        """How many leading token_ids the grammar accepts from its current state (the state is unchanged)."""
        matcher, num = self.matcher, 0
        for token_id in token_ids:
            if matcher.is_terminated() or not matcher.accept_token(token_id):
                break
            num += 1
        if num:
            matcher.rollback(num)
        return num

    def fill_bitmasks(self, bitmask, row: int, token_ids: list[int]) -> None:
        """Speculative decoding: rows row .. row + len(token_ids), the masks after each prefix of token_ids
        (all accepted by the grammar: num_valid checked them); the state is unchanged afterwards."""
        matcher = self.matcher
        matcher.fill_next_token_bitmask(bitmask, row)
        for i, token_id in enumerate(token_ids):
            accepted = matcher.accept_token(token_id)
            assert accepted, "proposals are cut to what the grammar accepts"
            matcher.fill_next_token_bitmask(bitmask, row + i + 1)
        if token_ids:
            matcher.rollback(len(token_ids))


class StructuredOutputManager:
    """Builds grammars for one engine's tokenizer: validation, a compile pool and a compiled-grammar cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = [t for t in stop_token_ids if t is not None]
        self._lock = threading.Lock()
        self._compiler = None
        self._compiler_future: concurrent.futures.Future | None = None
        self._cache: dict[tuple[str, str], concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(_NUM_COMPILE_THREADS, thread_name_prefix="pagellm-grammar")

    # ---- validation and compiling (any thread; compiles run in the pool) ----------------------

    def validate(self, params: StructuredOutputsParams) -> None:
        """Raise InvalidRequest naming the field unless the spec builds a grammar; a cached spec passes at once."""
        if self._cached(params.cache_key) is None:
            self._build(params)

    def prepare(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """Validate a spec and start compiling it (or find it cached); the future holds the compiled grammar."""
        key = params.cache_key
        future = self._cached(key)
        if future is not None:
            return future
        grammar = self._build(params)  # NOTE: outside the lock: a parse takes about a millisecond
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None):
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))  # the oldest entry
                future = self._pool.submit(self._compile, grammar)
                self._cache[key] = future
        return future

    def grammar_for(self, params: StructuredOutputsParams) -> GrammarState:
        """A new request's GrammarState; ready once its compile (in the pool, or a cache hit) is done."""
        return GrammarState(self.prepare(params), params.kind)

    def _cached(self, key: tuple[str, str]) -> concurrent.futures.Future | None:
        with self._lock:
            future = self._cache.get(key)
        if future is not None and future.done() and future.exception() is not None:
            return None  # a failed compile is retried, not cached
        return future

    def _build(self, params: StructuredOutputsParams) -> Any:
        """The xgrammar Grammar of a spec (a parse, no token masks yet)."""
        try:
            import xgrammar as xgr
        except ImportError as exc:  # an install without it: say so, not "invalid schema"
            raise InvalidRequest("structured output needs the xgrammar package, which this installation lacks "
                                 "(pip install --no-deps xgrammar==0.2.9 && pip install 'apache-tvm-ffi>=0.1.11'; "
                                 "`make setup` does this)", param=f"structured_outputs.{params.kind}") from exc

        kind = params.kind
        param = f"structured_outputs.{kind}"
        try:
            if kind in ("json", "json_object"):
                compact = _is_compact(params.whitespace_pattern)
                # NOTE: json_object is any JSON object: the schema {"type": "object"} without strict mode
                schema = json.dumps(params.json) if kind == "json" else '{"type": "object"}'
                return xgr.Grammar.from_json_schema(schema, any_whitespace=not compact, strict_mode=kind == "json",
                                                    max_whitespace_cnt=None if compact else MAX_WHITESPACE)
            if kind == "regex":
                return xgr.Grammar.from_regex(params.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
            return xgr.Grammar.from_ebnf(params.grammar)
        except InvalidRequest:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError (C++) or ValueError with a message
            raise InvalidRequest(f"{param} is not supported or invalid: {_clean(exc)}", param=param) from exc

    def _get_compiler(self):
        # NOTE: runs in a pool thread: the tokenizer info (~0.5 s for a 49k vocabulary) and the import of
        # xgrammar (seconds) never block the engine loop.
        with self._lock:
            if self._compiler_future is None:
                self._compiler_future = concurrent.futures.Future()
                owner = True
            else:
                owner = False
        if owner:
            try:
                import xgrammar as xgr

                info = build_tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
                compiler = xgr.GrammarCompiler(info, max_threads=_NUM_COMPILE_THREADS)
                # NOTE: the CPU masking kernel loads on its first call (seconds): do that here, not in a step
                import torch

                xgr.apply_token_bitmask_inplace(torch.zeros(1, 32), torch.full((1, 1), -1, dtype=torch.int32))
                self._compiler_future.set_result(compiler)
            except BaseException as exc:  # noqa: BLE001 - every waiting compile sees it
                self._compiler_future.set_exception(exc)
        return self._compiler_future.result()

    def _compile(self, grammar: Any):
        return self._get_compiler().compile_grammar(grammar)

    def warm_up(self) -> concurrent.futures.Future:
        """Start loading xgrammar and the tokenizer info in the pool (e.g. at server start)."""
        return self._pool.submit(self._get_compiler)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
