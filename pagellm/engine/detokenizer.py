"""Incremental detokenization: generated token ids -> output text, stop strings, streamed deltas."""

from __future__ import annotations

from pagellm.sampling_params import SamplingParams

# Prompt tokens decoded in front of the first output token, so tokenizers whose decode depends on the
# previous token (e.g. a SentencePiece leading space) render it as in a full decode. A few suffice.
NUM_CONTEXT_TOKENS = 5
# Once the decode window starts this many tokens in, drop the ids before it (amortized O(1)).
_TRIM_IDS_AFTER = 256
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Owns one request's output text: decodes new tokens over a small window, applies stop strings,
    and hands out streaming deltas that are never cut later.

    Decode window (HF TextStreamer / vLLM offsets): ``decode(ids[prefix_offset:])`` minus the
    ``prefix_len`` chars of ``decode(ids[prefix_offset:read_offset])`` is the new text; both offsets
    move only when the window ends on a whole character, so each token costs two decodes of a few tokens.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stop_str: str | None = None  # the stop string that ended the text, if any
        self.is_finished = False  # no more text will come: every remaining char may be released
        self._enabled = params.detokenize
        self._stops = list(params.stop_list) if self._enabled else []
        self._max_stop_len = max(map(len, self._stops), default=0)
        self._parts: list[str] = []  # output text, in pieces (joined lazily by output_text)
        self._num_chars = 0
        self._num_sent = 0  # chars already returned by get_next_delta

        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:]) if self._enabled else []
        context_text = self._decode(context) if context else ""
        if context_text.endswith(_REPLACEMENT_CHAR):
            # NOTE: the prompt may end inside a UTF-8 character; the output's first bytes would then
            # merge into the prompt's last char and the char-count diff would be wrong. Decode without it.
            context, context_text = [], ""
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_len = len(context_text)  # len(decode(ids[prefix_offset:read_offset]))
        self._num_pending_chars = 0  # chars of the unfinished window already emitted

    @property
    def output_text(self) -> str:
        """The text so far: without a matched stop string (unless include_stop_str_in_output) and without
        a trailing incomplete UTF-8 character until more bytes or finishing complete it."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stops)

    def update(self, new_token_ids: list[int], finished: bool = False) -> str | None:
        """Append generated tokens; return the stop string if one now appears in the text, else None.

        ``finished`` says the request ends with these tokens: pending bytes are flushed as they decode.
        Calls after the text finished are ignored (a stop string may match before the engine stops).
        """
        if not self._enabled or self.is_finished:
            return None
        self._ids.extend(new_token_ids)
        new_text = self._decode_new_text(finished) if len(self._ids) > self._read_offset else ""
        if new_text:
            self._parts.append(new_text)
            self._num_chars += len(new_text)
        self.is_finished = finished
        if not new_text or not self._stops:
            return None
        return self._check_stop(len(new_text))

    def get_next_delta(self) -> str:
        """Text not returned by earlier calls. While unfinished, a tail that may still begin a stop string
        is held back, so a streamed char is never cut afterwards."""
        end = self._num_chars if self.is_finished else self._num_chars - self._num_held_chars()
        if end <= self._num_sent:
            return ""
        delta = self._tail(self._num_chars - self._num_sent)[: end - self._num_sent]
        self._num_sent = end
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.params.skip_special_tokens)

    def _decode_new_text(self, finished: bool) -> str:
        window_text = self._decode(self._ids[self._prefix_offset :])
        num_emitted = self._prefix_len + self._num_pending_chars
        if window_text.endswith(_REPLACEMENT_CHAR) and not finished:
            # NOTE: a trailing U+FFFD may be a partial UTF-8 sequence that the next bytes complete. The text
            # before it can no longer change, so emit that and keep the window open until the char is whole.
            new_text = window_text.rstrip(_REPLACEMENT_CHAR)[num_emitted:]
            self._num_pending_chars += len(new_text)
            return new_text
        new_text = window_text[num_emitted:]
        # The window ends on a whole char: slide it to start at the old read offset (a token of context).
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        self._num_pending_chars = 0
        if self._prefix_offset >= _TRIM_IDS_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text

    def _check_stop(self, num_new_chars: int) -> str | None:
        """Find a stop string ending in the new text; on a match cut the text and finish."""
        # A match ending in older text was found by an earlier call, so only the new text plus an overlap
        # of (max stop length - 1) chars can hold a new one.
        num_window_chars = min(self._num_chars, num_new_chars + self._max_stop_len - 1)
        window = self._tail(num_window_chars)
        # The match that completes first wins, then the one starting first: the result depends only on the
        # text, never on how it was split into tokens or updates.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = window.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        keep = end if self.params.include_stop_str_in_output else start
        self._truncate(self._num_chars - num_window_chars + keep)
        self.stop_str = stop
        self.is_finished = True
        return stop

    def _num_held_chars(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        tail = self._tail(self._max_stop_len - 1)
        for start in range(len(tail)):  # longest suffix first
            suffix = tail[start:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return len(suffix)
        return 0

    def _tail(self, num_chars: int) -> str:
        """The last num_chars chars of the text, touching only the parts that hold them."""
        if num_chars <= 0:
            return ""
        pieces: list[str] = []
        count = 0
        for part in reversed(self._parts):
            pieces.append(part)
            count += len(part)
            if count >= num_chars:
                break
        return "".join(reversed(pieces))[-num_chars:]

    def _truncate(self, num_chars: int) -> None:
        assert 0 <= num_chars <= self._num_chars, f"cannot cut {self._num_chars} chars to {num_chars}"
        assert self._num_sent <= num_chars, "a streamed delta would be cut by a stop string"
        excess = self._num_chars - num_chars
        while excess > 0:
            last = self._parts.pop()
            if len(last) > excess:
                self._parts.append(last[: len(last) - excess])
                break
            excess -= len(last)
        self._num_chars = num_chars
