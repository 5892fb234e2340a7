"""Indexing and retrieval: entries -> vectors from pagellm's embedding engine (`LLM(task="embed")`, the bundled
MiniLM by default) -> the store; a question -> dense hits + BM25 hits -> reciprocal-rank fusion -> a calibrated
confidence that the top hit answers the question.

The index folder keeps `meta.json` (encoder, embedded fields, calibration) beside the embedded store's files,
so `pagellm helpdesk serve --index DIR` rebuilds the same retriever.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagellm.apps.helpdesk.kb import Entry, lexical_tokens
from pagellm.apps.helpdesk.store import HelpdeskStore, open_store

# What each embedded field reads of an entry. An entry's dense score is the max over its fields' vectors.
FIELD_TEXT = {
    "q": lambda e: e.question,
    "qa": lambda e: f"{e.question}\n{e.answer}",
    "a": lambda e: e.answer,
}
DEFAULT_FIELDS = ("q", "qa")
# Score fusion: fused = dense cosine + LEXICAL_WEIGHT * BM25 / (the query's best BM25). Fixed by hand, not fitted;
# docs/helpdesk.md shows the sweep over it and reciprocal-rank fusion on both question sets.
LEXICAL_WEIGHT = 0.1
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009's value), the alternative `fusion="rrf"`
CANDIDATES = 20  # hits taken from each retriever before fusion


@dataclass
class Calibration:
    """P(top hit is right) = sigmoid(w_dense * top dense cosine + w_margin * (top - second cosine) + w_agree *
    [dense and lexical agree on the top hit] + bias), fitted by logistic regression on a labelled question set
    (`pagellm helpdesk index --calibrate FILE`); the defaults were fitted on tests/data/faq/dev_questions.jsonl."""

    # sklearn LogisticRegression(C=10) on the 36 dev questions (24 in the FAQ's scope, 12 outside it)
    w_dense: float = 4.967
    w_margin: float = 2.784
    w_agree: float = 0.608
    bias: float = -3.210

    def confidence(self, features: Sequence[float]) -> float:
        z = self.w_dense * features[0] + self.w_margin * features[1] + self.w_agree * features[2] + self.bias
        return 1.0 / (1.0 + math.exp(-z))


@dataclass
class IndexMeta:
    """meta.json of an index folder."""

    encoder: str
    fields: list[str] = field(default_factory=lambda: list(DEFAULT_FIELDS))
    dim: int = 0
    store: str | None = None  # a postgresql:// URI, or None for the embedded store in the folder
    calibration: Calibration = field(default_factory=Calibration)

    def save(self, folder: Path) -> None:
        (folder / "meta.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> IndexMeta:
        path = folder / "meta.json"
        if not path.exists():
            from pagellm.errors import InvalidRequest

            raise InvalidRequest(f"{folder} is not a help desk index (no meta.json); build one with "
                                 "`pagellm helpdesk index --kb FILE --out DIR`", param="index")
        obj = json.loads(path.read_text())
        obj["calibration"] = Calibration(**obj.get("calibration", {}))
        return cls(**obj)


@dataclass(frozen=True)
class Hit:
    """One fused result: the entry, its fused score and the two retrievers' own scores (None: not in its top)."""

    entry: Entry
    score: float
    dense: float | None
    lexical: float | None


@dataclass
class Retrieval:
    """What one question retrieved."""

    query: str
    hits: list[Hit]
    confidence: float
    features: list[float]
    elapsed_s: float = 0.0


def bundled_encoder() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


class Embedder:
    """L2-normalized vectors from pagellm's embedding engine."""

    def __init__(self, model: str | None = None) -> None:
        from pagellm import LLM

        self.model = model or bundled_encoder()
        self.llm = LLM(self.model, task="embed", dtype="float32")
        self.dim = len(self.embed(["probe"])[0])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        outs = self.llm.embed(list(texts), truncate_prompt_tokens=-1, use_tqdm=False)
        vectors = np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)
        # NOTE: MiniLM's folder normalizes already; an encoder that does not still gets cosine scores
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass
class IndexReport:
    num_added: int
    num_changed: int
    num_removed: int
    num_unchanged: int
    elapsed_s: float


def build_index(entries: list[Entry], store: HelpdeskStore, embedder: Embedder, fields: Sequence[str],
                batch_size: int = 64) -> IndexReport:
    """Bring the store to `entries`: embed only new and changed entries (by content hash), drop removed ones."""
    t0 = time.perf_counter()
    stored = store.hashes()
    todo = [e for e in entries if stored.get(e.id) != e.content_hash()]
    gone = sorted(set(stored) - {e.id for e in entries})
    store.remove(gone)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        texts = [FIELD_TEXT[f](e) for e in batch for f in fields]
        vectors = embedder.embed(texts).reshape(len(batch), len(fields), -1)
        store.upsert(batch, vectors, list(fields), [lexical_tokens(f"{e.question} {e.answer}") for e in batch])
    num_changed = sum(e.id in stored for e in todo)
    return IndexReport(len(todo) - num_changed, num_changed, len(gone), len(entries) - len(todo),
                       time.perf_counter() - t0)


class Retriever:
    """Dense + BM25 retrieval over one store, fused by score (or reciprocal rank), with a calibrated confidence."""

    def __init__(self, store: HelpdeskStore, embedder: Embedder, calibration: Calibration | None = None,
                 use_dense: bool = True, use_lexical: bool = True, fusion: str = "score",
                 lexical_weight: float = LEXICAL_WEIGHT) -> None:
        assert fusion in ("score", "rrf"), fusion
        self.store, self.embedder = store, embedder
        self.calibration = calibration or Calibration()
        self.use_dense, self.use_lexical = use_dense, use_lexical
        self.fusion, self.lexical_weight = fusion, lexical_weight

    def retrieve(self, query: str, k: int = 5) -> Retrieval:
        t0 = time.perf_counter()
        dense = self.store.dense_search(self.embedder.embed([query])[0], CANDIDATES) if self.use_dense else []
        lexical = self.store.lexical_search(lexical_tokens(query), CANDIDATES) if self.use_lexical else []
        fused = self._fuse(dense, lexical)
        # NOTE: ties go to the better dense score, then the id: the order is deterministic
        dense_score, lexical_score = dict(dense), dict(lexical)
        order = sorted(fused, key=lambda i: (-fused[i], -dense_score.get(i, -1.0), i))[:k]
        found = self.store.entries(order)
        hits = [Hit(found[i], fused[i], dense_score.get(i), lexical_score.get(i)) for i in order if i in found]
        features = self._features(dense, lexical, hits)
        return Retrieval(query, hits, self.calibration.confidence(features) if hits else 0.0, features,
                         time.perf_counter() - t0)

    def _fuse(self, dense: list[tuple[str, float]], lexical: list[tuple[str, float]]) -> dict[str, float]:
        fused: dict[str, float] = {}
        if self.fusion == "rrf":
            for ranked in (dense, lexical):
                for rank, (entry_id, _) in enumerate(ranked):
                    fused[entry_id] = fused.get(entry_id, 0.0) + 1.0 / (RRF_K + rank + 1)
            return fused
        # an entry outside the dense candidates scores at most the last candidate's cosine: use that bound
        floor = dense[-1][1] if dense else 0.0
        best_lexical = lexical[0][1] if lexical and lexical[0][1] > 0 else 1.0
        for entry_id, score in dense:
            fused[entry_id] = score
        for entry_id, score in lexical:
            fused[entry_id] = fused.get(entry_id, floor) + self.lexical_weight * score / best_lexical
        return fused

    @staticmethod
    def _features(dense: list[tuple[str, float]], lexical: list[tuple[str, float]], hits: list[Hit]) -> list[float]:
        if not hits:
            return [0.0, 0.0, 0.0]
        top = hits[0].dense if hits[0].dense is not None else 0.0
        others = [s for i, s in dense if i != hits[0].entry.id]
        margin = top - others[0] if others else top
        agree = float(bool(dense) and bool(lexical) and dense[0][0] == lexical[0][0] == hits[0].entry.id)
        return [top, margin, agree]


def open_index(folder: str | Path, embedder: Embedder | None = None, store_uri: str | None = None
               ) -> tuple[IndexMeta, HelpdeskStore, Embedder]:
    """An index folder's meta, its store and its encoder (an embedder given is reused)."""
    folder = Path(folder)
    meta = IndexMeta.load(folder)
    embedder = embedder or Embedder(meta.encoder)
    return meta, open_store(folder, meta.dim, store_uri or meta.store), embedder


def recall_at(retriever: Retriever, questions: list[dict[str, Any]], ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Share of the questions whose labelled entry id is in the top k hits."""
    ranks = []
    for q in questions:
        ids = [h.entry.id for h in retriever.retrieve(q["question"], max(ks)).hits]
        ranks.append(ids.index(q["id"]) if q["id"] in ids else None)
    return {k: sum(r is not None and r < k for r in ranks) / len(questions) for k in ks}
