"""Passages for retrieval QA: an index over a passage corpus, cached beside it, that gives each
question its top-k passages (`python -m hrpo.retrieve`, hrpo/retrieve.py, writes them into
prepared data); and one passage as the QA tasks read it.

Corpus: JSONL (or .json / .parquet) of passages in FlashRAG's and Search-R1's form
{id, contents: '"Title"\\ntext'} or as {title, text} (HippoRAG's 2Wiki corpus).

Methods:
- bm25 (default): BM25 by bm25s (Lucene's variant, k1 1.5, b 0.75; English stop words and
  Snowball stemming, close to Pyserini's analyser); runs anywhere, no weights.
- dense: an E5-style encoder (a Hugging Face AutoModel folder or name, mean pooling,
  "query: " / "passage: " prefixes, cosine similarity) searched exactly with a matrix
  product; the embeddings of the whole corpus are held in memory.

An index is built once (with progress bars) and saved in a folder beside the corpus,
`<corpus>.bm25` or `<corpus>.dense` (or under cache_dir): bm25s's own files (numpy .npy
arrays loaded with allow_pickle=False, JSON vocabulary and parameters) or the embeddings as
safetensors, and key.json. The key is the corpus's SHA-256 with the library version (and the
encoder's files for dense), so a changed corpus or encoder rebuilds; nothing in the cache
is executed on load. Passages are read back from the corpus itself, which is held in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import Stemmer
from tqdm import tqdm

from hrpo.core.errors import ConfigError
from hrpo.core.prompts import Example
from hrpo.tasks.records import DataError, Rejected, expected, field_path, given, is_text, kind, load_records

FORMAT = 1  # bump when what is cached, or how text is tokenised or encoded, changes
METHODS = ("bm25", "dense")
_STEMMER = Stemmer.Stemmer("english")


TOP_K = 3  # passages shown, as in the paper


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG's `contents`: the title (quoted) on the first line, then the text."""
    if "\n" not in contents:
        return "", contents
    title, text = contents.split("\n", 1)
    return title.strip().strip('"'), text


def passage(ctx: Any, name: str) -> dict:
    """One passage: a string, or an object {title, text} ({title, paragraph_text} in IRCoT's
    form, {contents} in FlashRAG's), with `supporting` (or `is_supporting`) kept if given."""
    if is_text(ctx):
        return {"title": "", "text": ctx}
    if not isinstance(ctx, dict):
        raise expected(name, "a non-empty string or an object with 'text'", ctx)
    key = next((k for k in ("text", "paragraph_text", "contents") if k in ctx), "text")
    text = ctx.get(key)
    if not is_text(text):
        raise expected(field_path(name, key), "a non-empty string", text)
    title = ctx.get("title")
    if title is not None and not isinstance(title, str):
        raise expected(field_path(name, "title"), "a string", title)
    if key == "contents" and title is None:
        title, text = split_contents(text)
        if not is_text(text):
            raise expected(field_path(name, key), "text after the title line", text)
    doc = {"title": title or "", "text": text}
    for flag in ("supporting", "is_supporting"):
        if given(ctx, flag):
            if not isinstance(ctx[flag], bool):
                raise expected(field_path(name, flag), "true or false", ctx[flag])
            doc["supporting"] = ctx[flag]
    return doc


def read_corpus(path: str | os.PathLike) -> list[dict]:
    """The corpus's passages {title, text}, in file order; a line that is not a passage is an
    error naming it (a corpus is used whole, never with holes)."""
    records, _ = load_records(os.fspath(path))
    passages = []
    for where, rec in records:
        try:
            if not isinstance(rec, dict):
                raise Rejected(f"expected a JSON object, got {kind(rec)}")
            passages.append(passage(rec, ""))
        except Rejected as reason:
            raise DataError(f"{where}: {reason}") from None
    return passages


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _doc_text(p: dict) -> str:
    """What is indexed of a passage: its title counts, as in FlashRAG's `contents`."""
    return f"{p['title']}\n{p['text']}" if p["title"] else p["text"]


def _tokenize(texts: list[str], ids: bool, progress: bool = False):
    return bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, return_ids=ids, show_progress=progress)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first, ties in corpus order (reproducible)."""
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.lexsort((best, -scores[best]))]


class BM25Index:
    method = "bm25"

    def __init__(self, passages: list[dict], model: bm25s.BM25):
        self.passages, self.model = passages, model

    @classmethod
    def build(cls, passages: list[dict], progress: bool = True) -> BM25Index:
        tokens = _tokenize([_doc_text(p) for p in passages], ids=True, progress=progress)
        if not tokens.vocab:  # bm25s cannot index nothing
            raise DataError("no passage has a word to index (only stop words and single characters)")
        model = bm25s.BM25()
        model.index(tokens, show_progress=progress)
        return cls(passages, model)

    def save(self, folder: Path) -> None:
        self.model.save(folder, show_progress=False)

    @classmethod
    def load(cls, folder: Path, passages: list[dict]) -> BM25Index:
        model = bm25s.BM25.load(folder, load_corpus=False, allow_pickle=False)
        if model.scores["num_docs"] != len(passages):
            raise ValueError(f"{folder}: index of {model.scores['num_docs']} passages for a corpus of {len(passages)}")
        return cls(passages, model)

    def scores(self, tokens: list[str]) -> np.ndarray:
        return self.model.get_scores_from_ids(self.model.get_tokens_ids(tokens))

    def search(self, questions: list[str], k: int, progress: bool = False) -> list[list[dict]]:
        """The top k passages of each question, best first (copies: the caller may change them)."""
        tokens = _tokenize(questions, ids=False)
        return [
            [dict(self.passages[i]) for i in _top(self.scores(t), k)]
            for t in tqdm(tokens, desc="bm25 search", disable=not progress, leave=False)
        ]


class E5Encoder:
    """An E5-style encoder: the mean of the last hidden states over real tokens, L2-normalised;
    texts are prefixed "query: " or "passage: " as E5 models were trained."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 64, max_length: int = 512):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        # No longer than the model's positions (E5: 512).
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self.path, self.batch_size = path, batch_size

    def fingerprint(self) -> str:
        """The encoder's identity for the cache key: its files' names, sizes and times, or
        its hub name."""
        folder = Path(self.path)
        if not folder.is_dir():
            return self.path
        stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()

    def encode(self, texts: list[str], prefix: str, progress: bool = False):
        import torch

        out = []
        with torch.inference_mode():
            for lo in tqdm(
                range(0, len(texts), self.batch_size),
                desc=f"encode {prefix.strip()}",
                disable=not progress,
                leave=False,
            ):
                batch = self.tokenizer(
                    [prefix + t for t in texts[lo : lo + self.batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class DenseIndex:
    method = "dense"

    def __init__(self, passages: list[dict], embeddings, encoder: E5Encoder):
        self.passages, self.embeddings, self.encoder = passages, embeddings, encoder

    @classmethod
    def build(cls, passages: list[dict], encoder: E5Encoder, progress: bool = True) -> DenseIndex:
        return cls(passages, encoder.encode([_doc_text(p) for p in passages], "passage: ", progress), encoder)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.contiguous()}, str(folder / "embeddings.safetensors"))

    @classmethod
    def load(cls, folder: Path, passages: list[dict], encoder: E5Encoder) -> DenseIndex:
        from safetensors.torch import load_file

        embeddings = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
        if embeddings.shape[0] != len(passages):
            raise ValueError(f"{folder}: index of {embeddings.shape[0]} passages for a corpus of {len(passages)}")
        return cls(passages, embeddings, encoder)

    def search(self, questions: list[str], k: int, progress: bool = False) -> list[list[dict]]:
        import torch

        queries = self.encoder.encode(questions, "query: ", progress).to(self.encoder.device)
        embeddings = self.embeddings.to(self.encoder.device)
        k = min(k, len(self.passages))
        found = []
        for lo in range(0, len(queries), 256):  # bounds the (queries x corpus) score matrix
            top = torch.topk(queries[lo : lo + 256] @ embeddings.T, k, dim=1).indices
            found += [[dict(self.passages[i]) for i in row] for row in top.tolist()]
        return found


def check_options(method: str, encoder: str | None, k: int = TOP_K) -> None:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "dense" and not encoder:
        raise ConfigError("--method dense needs --encoder (an E5-style model folder or hub name)")


def open_index(
    corpus: str | os.PathLike,
    method: str = "bm25",
    encoder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """The index of `corpus`: loaded from its cache when the key matches, else built and
    saved there. A cache that cannot be written (a read-only folder) is warned about and
    skipped; one that cannot be read is rebuilt."""
    check_options(method, encoder)
    corpus = Path(corpus)
    if not corpus.is_file():
        raise DataError(f"{corpus}: no such corpus file")
    passages = read_corpus(corpus)
    if not passages:
        raise DataError(f"{corpus}: corpus is empty")
    key = {"format": FORMAT, "method": method, "corpus_sha256": file_digest(corpus)}
    if method == "dense":
        index_cls, extra = DenseIndex, (E5Encoder(encoder),)
        key["encoder"] = extra[0].fingerprint()
    else:
        index_cls, extra = BM25Index, ()
        key["bm25s"] = bm25s.__version__
    folder = Path(cache_dir or corpus.parent) / f"{corpus.name}.{method}"
    if _read_key(folder) == key:
        try:
            return index_cls.load(folder, passages, *extra)
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(f"{folder}: cached index unreadable ({err}); rebuilding", stacklevel=2)
    index = index_cls.build(passages, *extra, progress=progress)
    _save(index, folder, key)
    return index


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "key.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _save(index, folder: Path, key: dict) -> None:
    """Write the index beside its final place, then swap it in; a folder there that is not
    one of our caches (no key.json) is never replaced."""
    if folder.exists() and not (folder / "key.json").is_file():
        warnings.warn(f"{folder} exists and is not an hrpo index; the index is not cached", stacklevel=3)
        return
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        index.save(tmp)
        (tmp / "key.json").write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(
            f"{folder}: the index is not cached ({err.strerror or err}); pass cache_dir / --cache-dir", stacklevel=3
        )


def rank(question: str, passages: list[dict]) -> list[dict]:
    """A question's own paragraphs (a distractor set), best first by BM25 over them alone;
    ties keep their given order."""
    try:
        index = BM25Index.build(passages, progress=False)
    except DataError:  # no words to rank by (or no passages): keep their order
        return list(passages)
    return index.search([question], len(passages))[0]


def attach_contexts(
    examples: list[Example],
    corpus: str | os.PathLike,
    k: int = TOP_K,
    method: str = "bm25",
    encoder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[Example]:
    """A new list of the examples in which those without passages are replaced by copies
    given the top k of `corpus` for their question; the others are the same objects and no
    input is changed. The index is opened (built the first time) only if some example needs it."""
    check_options(method, encoder, k)
    missing = [i for i, ex in enumerate(examples) if not ex.contexts]
    out = list(examples)
    if missing:
        index = open_index(corpus, method, encoder, cache_dir, progress)
        found = index.search([examples[i].question for i in missing], k, progress)
        for i, docs in zip(missing, found):
            out[i] = dataclasses.replace(examples[i], contexts=docs)
    return out
