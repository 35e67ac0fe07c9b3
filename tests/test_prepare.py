"""prepare-data: tokenizer, windows, split, manifest, determinism, and every bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from logitcache.cache.hashing import array_sha256
from logitcache.pipeline.config import load_config
from logitcache.pipeline.corpus import group_documents
from logitcache.pipeline.errors import ConfigError, DataError, StageError
from logitcache.pipeline.prepare import PreparedData, prepare_data

from .conftest import write_config


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the provenance record (which holds a timestamp)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }


def test_prepare_outputs(tiny_config: Path):
    config = load_config(tiny_config)
    out = prepare_data(config)
    data = PreparedData.open(out)
    manifest = data.manifest

    # The tokenizer: HF-loadable, special tokens at 0/1/2, BOS prepended like Llama tokenizers.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    assert tok("Emma Woodhouse")["input_ids"][0] == 1
    assert manifest["vocab_size"] == 512 == tok.vocab_size

    # Windows: shape, dtype, recorded hashes, and they decode back to corpus text.
    train = data.windows("train")
    assert train.dtype == np.uint16 and train.shape[1] == 32
    for split in ("train", "dev", "test"):
        windows = data.windows(split)
        assert manifest["splits"][split]["windows"] == windows.shape[0]
        assert manifest["splits"][split]["windows_sha256"] == array_sha256(windows)
    assert train.shape[0] > 10 * data.windows("dev").shape[0] // 3
    text = tok.decode(train[:4].reshape(-1).tolist(), skip_special_tokens=True)
    corpus_text = " ".join(p.read_text() for p in sorted(Path(config.data.corpus).glob("*.txt")))
    words = text.split()[5:25]  # window edges cut words: compare an inner run of words
    assert " ".join(words) in " ".join(corpus_text.split())

    # Manifest: counts add up and the inputs are hashed.
    stats = manifest["splits"]["train"]
    assert stats["windows"] * 32 + stats["dropped_tokens"] == stats["tokens"] + 2 * stats["documents"]
    for entry in manifest["inputs"]:
        path = Path(config.data.corpus) / entry["path"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()

    # Stored with a crc32c checksum in each chunk.
    codecs = json.loads((out / "windows.zarr" / "train" / "zarr.json").read_text())["codecs"]
    assert codecs[-1]["name"] == "crc32c"
    assert (out / "COMPLETE.json").is_file() and (out / "provenance.json").is_file()


def test_split_is_by_document(tiny_config: Path):
    config = load_config(tiny_config)
    from logitcache.pipeline.corpus import read_corpus

    _, splits = read_corpus(config.data)
    keys = {name: {(d.source, d.index) for d in docs} for name, docs in splits.items()}
    assert keys["train"] and keys["dev"] and keys["test"]
    assert (
        not keys["train"] & keys["dev"]
        and not keys["train"] & keys["test"]
        and not keys["dev"] & keys["test"]
    )
    dev_fraction = len(keys["dev"]) / sum(len(v) for v in keys.values())
    assert 0.03 < dev_fraction < 0.25


def test_deterministic_bytes(tmp_path: Path, small_corpus: Path):
    a = prepare_data(load_config(write_config(tmp_path / "a.toml", small_corpus, tmp_path / "ra")))
    b = prepare_data(load_config(write_config(tmp_path / "b.toml", small_corpus, tmp_path / "rb")))
    digest_a, digest_b = _tree_digest(a), _tree_digest(b)
    assert digest_a == digest_b
    assert "tokenizer.json" in digest_a and "windows.zarr/train/zarr.json" in digest_a


def test_skip_when_complete_and_refuse_other_config(tiny_config: Path):
    config = load_config(tiny_config)
    out = prepare_data(config)
    before = (out / "manifest.json").stat().st_mtime_ns
    prepare_data(config)
    assert (out / "manifest.json").stat().st_mtime_ns == before
    other = load_config(tiny_config, ["data.seq_len=16"])
    with pytest.raises(StageError, match="holds prepared data made from a different config.*--overwrite"):
        prepare_data(other)
    assert PreparedData.open(out).seq_len == 32  # the complete output is untouched
    assert PreparedData.open(prepare_data(other, overwrite=True)).seq_len == 16


def test_babylm_files_and_jsonl(tmp_path: Path, small_corpus: Path):
    texts = sorted(small_corpus.glob("*.txt"))
    babylm = tmp_path / "babylm"
    babylm.mkdir()
    (babylm / "a.train").write_text(texts[0].read_text() + "\n\n" + texts[1].read_text())
    with gzip.open(babylm / "b.train.gz", "wt") as handle:
        handle.write(texts[2].read_text())
    (babylm / "a.dev").write_text(texts[3].read_text())
    config = load_config(write_config(tmp_path / "c.toml", babylm, tmp_path / "r1"))
    data = PreparedData.open(prepare_data(config))
    assert data.manifest["splits"]["test"]["windows"] == 0  # no .test file: no test split
    assert [i["path"] for i in data.manifest["inputs"]] == ["a.dev", "a.train", "b.train.gz"]
    dev_words = data.manifest["splits"]["dev"]["words"]
    assert dev_words == len(texts[3].read_text().split())

    jsonl = tmp_path / "docs.jsonl"
    with jsonl.open("w") as handle:
        for path in texts:
            for paragraph in path.read_text().split("\n\n"):
                handle.write(json.dumps({"body": paragraph}) + "\n")
    config = load_config(write_config(tmp_path / "j.toml", jsonl, tmp_path / "r2"), ["data.jsonl_field=body"])
    data = PreparedData.open(prepare_data(config))
    assert data.manifest["splits"]["train"]["windows"] > 0 and data.manifest["splits"]["dev"]["windows"] > 0


def test_license_and_attribution_files_are_not_training_text(tmp_path: Path, small_corpus: Path):
    """The include/exclude rule: only corpus text is read; license texts, READMEs and SOURCES stay out."""
    root = tmp_path / "with-licenses"
    shutil.copytree(small_corpus, root)
    (root / "LICENSES").mkdir()
    (root / "LICENSES" / "austen.txt").write_text("Permission is hereby granted " * 50)
    (root / "README.txt").write_text("readme words " * 50)
    (root / "SOURCES.md").write_text("sources")
    (root / "nested").mkdir()
    (root / "nested" / "COPYING.txt.gz").write_bytes(gzip.compress(b"copying words " * 50))
    (root / "nested" / "extra.txt").write_text(" ".join(f"extra{i}" for i in range(100)))
    config = load_config(write_config(tmp_path / "c.toml", root, tmp_path / "r"))
    out = prepare_data(config)
    data = PreparedData.open(out)
    expected = sorted(p.name for p in small_corpus.glob("*.txt")) + ["nested/extra.txt"]
    assert sorted(i["path"] for i in data.manifest["inputs"]) == sorted(expected)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert not any("Permission" in token or "readme" in token for token in vocab)

    # Explicit patterns: only *.txt under folders not named 'nested'.
    config = load_config(
        config.source,
        ['data.exclude=["nested"]', 'data.include=["*.txt"]', "run.dir=" + str(tmp_path / "r2")],
    )
    data = PreparedData.open(prepare_data(config))
    assert sorted(i["path"] for i in data.manifest["inputs"]) == sorted(
        ["LICENSES/austen.txt", "README.txt"] + [p.name for p in small_corpus.glob("*.txt")]
    )


def test_corpus_patterns_are_validated(tmp_path: Path, small_corpus: Path):
    path = write_config(tmp_path / "c.toml", small_corpus, tmp_path / "r")
    with pytest.raises(ConfigError, match="data.include"):
        load_config(path, ["data.include=[]"])
    with pytest.raises(ConfigError, match="no '/'"):
        load_config(path, ['data.exclude=["a/b"]'])


def test_group_documents_cuts_long_line_files():
    lines = "\n".join(f"utterance number {i} is here" for i in range(1000))  # 5000 words, no blank line
    docs = group_documents(lines, document_words=100)
    assert len(docs) == 50 and all(len(d.split()) == 100 for d in docs)
    assert "\n".join(docs) == lines


# ---------------------------------------------------------------------------------------------
# Bad input: one-line error, nothing left that looks complete.


def _expect_data_error(config_path: Path, match: str, overrides: list[str] | None = None) -> None:
    config = load_config(config_path, overrides or [])
    with pytest.raises(DataError, match=match) as info:
        prepare_data(config)
    assert "\n" not in str(info.value)
    assert not (config.run_dir / "data").exists()


def test_missing_corpus(tmp_path: Path):
    _expect_data_error(write_config(tmp_path / "c.toml", tmp_path / "nope", tmp_path / "r"), "does not exist")


def test_no_text_files(tmp_path: Path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "image.png").write_bytes(b"\x89PNG")
    _expect_data_error(write_config(tmp_path / "c.toml", root, tmp_path / "r"), "Found none")


def test_empty_corpus(tmp_path: Path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("   \n\n  \n")
    (root / "b.txt").write_text("")
    _expect_data_error(write_config(tmp_path / "c.toml", root, tmp_path / "r"), "All files are empty")


def test_undecodable_bytes_reported_with_offset_and_skippable(tmp_path: Path, small_corpus: Path):
    bad = small_corpus / "zz-bad.txt"
    bad.write_bytes(b"Good text here.\n\nthen a bad byte \xff in the middle")
    config_path = write_config(tmp_path / "c.toml", small_corpus, tmp_path / "r")
    _expect_data_error(config_path, r"zz-bad.txt: not valid UTF-8 at byte offset 33")
    config = load_config(config_path, ["data.on_decode_error=skip"])
    with pytest.warns(UserWarning, match="skipping .*zz-bad.txt"):
        data = PreparedData.open(prepare_data(config))
    assert "zz-bad.txt" in [i["path"] for i in data.manifest["inputs"]]
    assert data.manifest["splits"]["train"]["windows"] > 0


def test_split_too_small_for_one_window(tmp_path: Path, small_corpus: Path):
    config_path = write_config(tmp_path / "c.toml", small_corpus, tmp_path / "r", seq_len=20000)
    _expect_data_error(
        config_path, r"The dev split holds \d+ tokens, fewer than one window of data.seq_len=20000"
    )


def test_failed_overwrite_keeps_previous_output(tiny_config: Path, tmp_path: Path):
    config = load_config(tiny_config)
    out = prepare_data(config)
    digest = _tree_digest(out)
    broken = load_config(tiny_config, ["data.seq_len=100000"])
    with pytest.raises(DataError):
        prepare_data(broken, overwrite=True)
    assert _tree_digest(out) == digest


def test_auto_tokenizer_loads_from_data(tiny_config: Path):
    out = prepare_data(load_config(tiny_config))
    tok = AutoTokenizer.from_pretrained(out)  # tokenizer.json alone is enough for AutoTokenizer
    assert tok.decode(
        tok("It is a truth universally acknowledged")["input_ids"], skip_special_tokens=True
    ) == ("It is a truth universally acknowledged")
    assert zarr.open_group(out / "windows.zarr", mode="r")["train"].metadata.zarr_format == 3
