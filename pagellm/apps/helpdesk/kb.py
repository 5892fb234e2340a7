"""The knowledge base: entries read from a JSONL file of {id, question, answer, ...} (FAQ entries stay whole)
or a folder of .md/.txt/.html documents (cut into passages of about `CHUNK_WORDS` words at paragraph breaks),
the text normalization shared by every index, and the lexical tokenizer (Snowball-stemmed words) that the
SQLite and PostgreSQL stores both use, so their BM25 scores agree.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pagellm.apps.files import jsonl_objects
from pagellm.errors import InvalidRequest

CHUNK_WORDS = 200
DOC_SUFFIXES = (".md", ".txt", ".html", ".htm", ".rst")


@dataclass(frozen=True)
class Entry:
    """One retrievable unit: an FAQ entry, or a passage of a document."""

    id: str
    question: str  # the FAQ question, or the document title (+ passage number) of a passage
    answer: str  # the answer / passage text, markup stripped for display and generation
    source: str = ""  # where it came from: FAQ page, or the document's file name
    section: str = ""

    def content_hash(self) -> str:
        """Changes exactly when something the index or the answer reads changes."""
        blob = json.dumps([self.question, self.answer, self.source, self.section])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


_ROLE = re.compile(r":[a-z:]+:`(?:[^`<]*<)?~?([^`>]+)>?`")  # :func:`len`, :ref:`text <label>` -> the name
_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`__?")  # `text <url>`_ -> text (url)


def clean_rest(text: str) -> str:
    """reST markup of the FAQ answers -> plain text (roles to their name, links to `text (url)`)."""
    text = _LINK.sub(lambda m: f"{m.group(1)} ({m.group(2)})", text)
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = text.replace("``", "").replace("::\n", ":\n")
    text = re.sub(r"^\.\. [a-z-]+::.*$", "", text, flags=re.M)
    text = re.sub(r"^\.\. _[^:]+:\s*$", "", text, flags=re.M)  # a label (.. _why-self:) of the next heading
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def load_kb(path: str | Path) -> list[Entry]:
    """Entries of a JSONL file or of a folder of documents; InvalidRequest names a bad line or file."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequest(f"knowledge base {path} does not exist", param="kb")
    entries = _load_folder(path) if path.is_dir() else _load_jsonl(path)
    if not entries:
        raise InvalidRequest(f"knowledge base {path} has no entries", param="kb")
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InvalidRequest(f"duplicate entry ids in {path}: {', '.join(dupes[:5])}", param="kb")
    return entries


def _load_jsonl(path: Path) -> list[Entry]:
    entries = []
    for number, obj in jsonl_objects(path, "kb"):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip()
                                                for k in ("question", "answer")):
            raise InvalidRequest(f"{path} line {number}: an entry needs non-empty question and answer strings",
                                 param="kb")
        entries.append(Entry(str(obj.get("id") or f"{path.stem}-{number}"), obj["question"].strip(),
                             clean_rest(obj["answer"]), str(obj.get("title") or obj.get("page") or ""),
                             str(obj.get("section") or "")))
    return entries


def _load_folder(folder: Path) -> list[Entry]:
    entries = []
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in DOC_SUFFIXES and p.is_file()):
        text = file.read_text(encoding="utf-8", errors="replace")
        if file.suffix.lower() in (".html", ".htm"):
            text = _html_text(text)
        title = _title(text) or file.stem.replace("_", " ").replace("-", " ")
        rel = str(file.relative_to(folder))
        for i, passage in enumerate(chunk_text(text)):
            entries.append(Entry(f"{rel}#{i}", f"{title} (part {i + 1})" if i else title, passage, rel))
    return entries


def _html_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", markup)
    markup = re.sub(r"(?i)<(br|/p|/div|/h[1-6]|/li)\b[^>]*>", "\n\n", markup)
    return html.unescape(re.sub(r"<[^>]+>", " ", markup))


def _title(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:120]
    return ""


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Passages of at most about `max_words` words, cut at paragraph breaks (a longer paragraph at words)."""
    passages: list[str] = []
    current: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        if current and len(current) + len(words) > max_words and len(words) <= max_words:
            passages.append(" ".join(current))  # the paragraph fits a passage of its own: start one
            current = []
        current += words
        while len(current) > max_words:  # an oversized paragraph: cut at words
            passages.append(" ".join(current[:max_words]))
            current = current[max_words:]
    if current:
        passages.append(" ".join(current))
    return [p for p in passages if p.strip()]


# ---- lexical tokens (BM25) ---------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")  # NOTE: as FTS5 unicode61 splits: "_" separates
# NOTE: a short English stop list; BM25's idf already discounts common words, this only keeps "how do i"
# from matching every FAQ question.
STOPWORDS = frozenset("""a an and are as at be but by can do does doing did for from had has have how i if in into
is it its me my of on or so than that the their them then there these they this to too was we were what when where
which while who why will with you your would should could am been being our ours us""".split())


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased, stop-word-free, Snowball-stemmed words: what BM25 counts in both stores."""
    words = [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]
    return _stemmer().stemWords(words)
