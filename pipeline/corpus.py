"""Reading a text corpus into documents and splitting them into train/dev/test.

Input is either a directory of UTF-8 text files (``.txt``, BabyLM's ``.train``/``.dev``/``.test``,
each optionally gzipped) or a JSONL file whose records carry a text field. A *document* is the
unit of the split: consecutive paragraphs (blank-line separated blocks) of one file grouped until
they hold at least ``document_words`` words; one JSONL record is one document. When a directory
holds BabyLM-style ``.dev``/``.test`` files, those files form the dev/test split as given;
otherwise documents are assigned to splits by a seeded hash, so the split is deterministic and
independent of the order files are listed in.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from logitcache.pipeline.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, DataConfig
from logitcache.pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".train", ".dev", ".test")
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str  # path relative to the corpus root, '/'-separated: part of the split hash
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Document:
    source: str
    index: int  # position of the document within its source
    text: str


def _logical_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), pattern.lower()) for pattern in patterns)


def is_corpus_file(rel: PurePosixPath, include: list[str], exclude: list[str]) -> bool:
    """Whether the file at ``rel`` (relative to the corpus root) is training text.

    Its name must match an ``include`` pattern and no part of its path (a folder or the name) an
    ``exclude`` pattern, so ``LICENSES/austen.txt`` and ``README.txt`` stay out by default.
    """
    return _matches(rel.name, include) and not any(_matches(part, exclude) for part in rel.parts)


def list_corpus_files(
    corpus: Path, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[Path]:
    """The corpus files, sorted by relative path (a stable order on every machine).

    In a directory, only the files that ``is_corpus_file`` accepts (``data.include`` /
    ``data.exclude``; the defaults are the text suffixes and the license/attribution names). A
    single file named as the corpus is read as given.
    """
    include = list(DEFAULT_INCLUDE) if include is None else include
    exclude = list(DEFAULT_EXCLUDE) if exclude is None else exclude
    if not str(corpus):
        raise DataError(
            "Expected data.corpus to name a directory of text files or a JSONL file. Got nothing."
        )
    if not corpus.exists():
        raise DataError(
            f"Expected a corpus directory or JSONL file. Got {str(corpus)!r}, which does not exist: set "
            "data.corpus (in the config or with --set) to an existing path."
        )
    if corpus.is_file():
        if corpus.name.endswith((".jsonl", ".jsonl.gz")):
            return [corpus]
        if _logical_suffix(corpus) in TEXT_SUFFIXES:
            return [corpus]
        raise DataError(
            f"Expected a .jsonl file or a directory of text files. Got the file {str(corpus)!r}; "
            "point data.corpus at its directory instead."
        )
    files = sorted(
        (
            p
            for p in corpus.rglob("*")
            if p.is_file()
            and is_corpus_file(PurePosixPath(p.relative_to(corpus).as_posix()), include, exclude)
        ),
        key=lambda p: p.relative_to(corpus).as_posix(),
    )
    if not files:
        raise DataError(
            f"Expected text files matching data.include ({', '.join(include)}) and not data.exclude "
            f"under {str(corpus)!r}. Found none; check data.corpus or the patterns."
        )
    return files


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc}).") from None
    return data


def _decode(path: Path, data: bytes, on_error: str) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = (
            f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason}). "
            'Convert the file to UTF-8, or set data.on_decode_error = "skip" to leave it out.'
        )
        if on_error == "skip":
            warnings.warn(f"skipping {message}", stacklevel=2)
            return None
        raise DataError(message) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _truncate(text: str, max_chars: int) -> str:
    """Keep the first ``max_chars`` characters, cut back to the last paragraph break."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars]


def split_paragraphs(text: str) -> list[str]:
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def group_documents(text: str, document_words: int) -> list[str]:
    """Group consecutive paragraphs into documents of at least ``document_words`` words.

    A paragraph longer than four documents (BabyLM files with one utterance per line and no blank
    lines) is cut at line breaks so that one file still yields many documents.
    """
    pieces: list[str] = []
    for paragraph in split_paragraphs(text):
        if len(paragraph.split()) <= 4 * document_words:
            pieces.append(paragraph)
            continue
        lines, count = [], 0
        for line in paragraph.split("\n"):
            lines.append(line)
            count += len(line.split())
            if count >= document_words:
                pieces.append("\n".join(lines))
                lines, count = [], 0
        if lines:
            pieces.append("\n".join(lines))
    documents: list[str] = []
    current: list[str] = []
    count = 0
    for piece in pieces:
        current.append(piece)
        count += len(piece.split())
        if count >= document_words:
            documents.append("\n\n".join(current))
            current, count = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def _hash_fraction(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(doc: Document, config: DataConfig) -> str:
    u = _hash_fraction(config.split_seed, doc.source, doc.index)
    if u < config.dev_fraction:
        return "dev"
    if u < config.dev_fraction + config.test_fraction:
        return "test"
    return "train"


def _jsonl_documents(path: Path, data: bytes, config: DataConfig, rel: str) -> Iterator[Document]:
    text = _decode(path, data, config.on_decode_error)
    if text is None:
        return
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg}).") from None
        value = record.get(config.jsonl_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{line_no}: expected a string field {config.jsonl_field!r} "
                "(set data.jsonl_field to the field that holds the text)."
            )
        value = _truncate(value.strip(), config.max_chars_per_file)
        if value:
            yield Document(rel, line_no, value)


def read_corpus(config: DataConfig) -> tuple[list[SourceFile], dict[str, list[Document]]]:
    """Read the corpus named by ``config.corpus`` into documents grouped by split."""
    root = Path(config.corpus)
    files = list_corpus_files(root, config.include, config.exclude)
    sources: list[SourceFile] = []
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    babylm_splits = root.is_dir() and any(_logical_suffix(p) in (".dev", ".test") for p in files)
    for path in files:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        data = _read_bytes(path)
        sources.append(SourceFile(path, rel, hashlib.sha256(data).hexdigest(), len(data)))
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            for doc in _jsonl_documents(path, data, config, rel):
                splits[assign_split(doc, config)].append(doc)
            continue
        text = _decode(path, data, config.on_decode_error)
        if text is None:
            continue
        text = _truncate(text, config.max_chars_per_file)
        fixed = {".dev": "dev", ".test": "test", ".train": "train"}.get(_logical_suffix(path))
        for index, body in enumerate(group_documents(text, config.document_words)):
            doc = Document(rel, index, body)
            splits[fixed if babylm_splits and fixed else assign_split(doc, config)].append(doc)
    if not any(splits.values()):
        raise DataError(
            f"Expected some text in the corpus at {str(root)!r}. All files are empty or were skipped."
        )
    return sources, splits
