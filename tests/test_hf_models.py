"""Pretrained Hugging Face models (issue 18 item 3) and `cache-logits --dry-run` (item 7).

Tiny random Llama, Qwen2, Mistral and GPT-2 models are made here and saved with
``save_pretrained(safe_serialization=True)`` beside a tokenizer trained here (byte-level BPE with its
special tokens at the end of the vocabulary, as GPT-2's and Llama-3's are, so that nothing relies on
the project's own ids 0/1/2); the output layers are padded to a multiple of 64 rows, some weights
are bf16. Every check compares with what transformers computes on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from logitcache.cache import open_cache
from logitcache.pipeline.cache_logits import cache_logits, dry_run, verify
from logitcache.pipeline.config import load_config
from logitcache.pipeline.corpus import read_corpus
from logitcache.pipeline.errors import ConfigError, DataError, TeacherError
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.student import LossOptions, StudentObjective, build_student, train_student
from logitcache.pipeline.teacher_signal import TeacherEnsemble

from .conftest import CORPUS, corpus_slice

PIPE = [sys.executable, "-m", "logitcache.pipeline.cli"]
BPE_VOCAB = 300  # trained tokens; + 2 special tokens = 302 ids, padded to 320 rows in the models
VOCAB = BPE_VOCAB + 2
PADDED = 320
SEQ_LEN = 32


# ----------------------------------------------------------------------------------------------
# Tiny HF tokenizers and models, made here


def make_tokenizer(texts: list[str], out: Path, *, style: str = "llama") -> Path:
    """A byte-level BPE tokenizer saved as an HF folder; special tokens after the BPE vocabulary.

    ``llama``: BOS ``<|begin|>`` and EOS ``<|end|>``; ``gpt2``: one ``<|endoftext|>`` for both.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if style == "llama":
        specials = {"bos_token": "<|begin|>", "eos_token": "<|end|>"}
    else:
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
    hf.add_special_tokens(specials)  # appended after the trained tokens
    hf.save_pretrained(out)
    return out


def hf_config(family: str, *, rows: int, tokenizer: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "vocab_size": rows}
    # initializer_range 0.2: peaked teacher distributions, so that top-k sets are well separated
    llama_like = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=False,
        **ids,
    )
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    return GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64, initializer_range=0.2, **ids
    )


def save_model(
    out: Path, family: str, tokenizer: Path, *, rows: int = PADDED, dtype=torch.float32, seed: int = 0
) -> Path:
    """A randomly initialised causal LM of ``family`` with its tokenizer, as an HF folder (safetensors)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, rows=rows, tokenizer=tokenizer)).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def config_text(corpus: Path, run: Path, tokenizer: Path, teachers: dict[str, Path], extra: str = "") -> str:
    tables = "".join(f'\n[teachers.{name}]\npath = "{path}"\n' for name, path in teachers.items())
    return (
        textwrap.dedent(
            f"""
            [run]
            dir = "{run}"
            seed = 3

            [data]
            corpus = "{corpus}"
            tokenizer = "{tokenizer}"
            seq_len = {SEQ_LEN}
            document_words = 64
            dev_fraction = 0.1
            test_fraction = 0.05

            [cache]
            k = 8
            batch_size = 16

            [student.model]
            hidden_size = 32
            num_layers = 2
            num_heads = 4
            intermediate_size = 64

            [student.train]
            batch_size = 8
            max_steps = 3
            lr = 1e-3
            log_every = 1
            eval_batch_size = 64
            """
        )
        + tables
        + extra
    )


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small corpus, two tokenizers and tiny HF models of four families (made once)."""
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus"
    corpus.mkdir()
    texts = []
    for name in sorted(p.name for p in CORPUS.glob("*.txt.gz"))[:4]:
        text = corpus_slice(name, 12_000)
        (corpus / name.removesuffix(".gz")).write_text(text)
        texts.append(text)
    tokenizer = make_tokenizer(texts, root / "tokenizer")
    paths = {
        "root": root,
        "corpus": corpus,
        "tokenizer": tokenizer,
        "gpt2_tokenizer": make_tokenizer(texts, root / "gpt2-tokenizer", style="gpt2"),
        "llama": save_model(root / "llama", "llama", tokenizer, seed=1),  # fp32, padded rows
        "qwen2": save_model(root / "qwen2", "qwen2", tokenizer, dtype=torch.bfloat16, seed=2),  # bf16
        "mistral": save_model(root / "mistral", "mistral", tokenizer, dtype=torch.bfloat16, seed=3),
        "gpt2": save_model(root / "gpt2", "gpt2", tokenizer, rows=VOCAB, seed=4),  # unpadded
    }
    return paths


def _config(hf: dict[str, Path], run: Path, teachers: dict[str, Path], *overrides: str, extra: str = ""):
    path = run.parent / f"{run.name}.toml"
    path.write_text(config_text(hf["corpus"], run, hf["tokenizer"], teachers, extra))
    return load_config(path, list(overrides))


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prepared(hf: dict[str, Path]) -> Path:
    """A run with data prepared with the HF tokenizer (shared, read only: tests copy it)."""
    run = hf["root"] / "prepared"
    prepare_data(_config(hf, run, {"llama": hf["llama"]}))
    return run


def _copy_run(prepared: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    return run


# ----------------------------------------------------------------------------------------------
# prepare-data with a pretrained tokenizer


def _pack_reference(tokenizer_dir: Path, config, split: str) -> np.ndarray:
    """The windows of ``split`` as transformers' tokenizer encodes the documents, framed and packed here."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    _, splits = read_corpus(config.data)
    prefix = [tok.bos_token_id] if tok.bos_token_id != tok.eos_token_id else []
    stream: list[int] = []
    for doc in splits[split]:
        stream += prefix + tok(doc.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // SEQ_LEN
    return np.array(stream[: n * SEQ_LEN]).reshape(n, SEQ_LEN)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_prepare_data_encodes_with_the_given_tokenizer(hf, tmp_path: Path, style: str):
    tokenizer = hf["tokenizer"] if style == "llama" else hf["gpt2_tokenizer"]
    config = _config(hf, tmp_path / "run", {}, f"data.tokenizer={tokenizer}", "data.vocab_size=64")
    data = PreparedData.open(prepare_data(config))
    tok = AutoTokenizer.from_pretrained(tokenizer)
    vocab = 302 if style == "llama" else 301
    assert data.vocab_size == vocab == len(tok)  # the tokenizer's, not data.vocab_size
    assert data.manifest["tokenizer_source"] == str(tokenizer)
    for split in ("train", "dev"):
        assert np.array_equal(data.windows(split), _pack_reference(tokenizer, config, split))
    # Documents are framed by the tokenizer's own special tokens (ids at the end of its vocabulary).
    train = data.windows("train")
    eos = tok.eos_token_id
    assert eos == vocab - 1 and (train == eos).sum() > 0
    bos_count = (train == tok.bos_token_id).sum()
    assert bos_count > 0 if style == "llama" else bos_count == (train == eos).sum()
    assert data.token_ids == {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
    }
    # The folder holds the tokenizer with the same vocabulary; AutoTokenizer loads it from RUN/data.
    assert data.hf_tokenizer().get_vocab() == tok.get_vocab()


def test_prepare_data_refuses_a_missing_tokenizer_writing_nothing(hf, tmp_path: Path):
    config = _config(hf, tmp_path / "run", {}, f"data.tokenizer={tmp_path / 'nope'}")
    with pytest.raises(DataError, match="Expected data.tokenizer to be a Hugging Face tokenizer folder"):
        prepare_data(config)
    assert not (tmp_path / "run").exists()
    args = [*PIPE, "prepare-data", str(tmp_path / "run.toml"), "--set", f"data.tokenizer={tmp_path / 'nope'}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# HF teachers: the cache against transformers on its own


def _reference_probs(model_dirs: list[Path], windows: np.ndarray) -> torch.Tensor:
    """(B, T, V) float64 ensemble probabilities: each teacher in its stored dtype, logits cut to V."""
    ids = torch.from_numpy(windows.astype(np.int64))
    logits = []
    for path in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits[..., :VOCAB].double())  # (B, T, V)
    return torch.stack(logits).mean(0).softmax(-1)


def test_cache_from_hf_teachers_of_two_families_then_students(hf, prepared: Path, tmp_path: Path):
    """prepare-data with data.tokenizer → cache-logits with a Llama (fp32) and a Qwen2 (bf16) teacher,
    both with padded output layers → train-student (a Mistral from its config) for a few steps."""
    run = _copy_run(prepared, tmp_path)
    teachers = {"llama": hf["llama"], "qwen": hf["qwen2"]}
    config = _config(hf, run, teachers, f"student.model.path={hf['mistral']}")
    cache_logits(config, progress=False)
    reader = open_cache(run / "cache" / "logits.zarr")
    assert [(t.name, t.dtype) for t in reader.metadata.teachers] == [
        ("llama", "float32"),
        ("qwen", "bfloat16"),
    ]
    assert reader.metadata.vocab_size == VOCAB
    data = PreparedData.open(run / "data")
    rows = np.array([0, 3, reader.num_windows - 1])
    probs = _reference_probs([hf["llama"], hf["qwen2"]], data.windows("train")[rows])  # (3, T, V)
    batch = reader.read_windows(rows, weights="ghost")
    assert int(batch.ids.max()) < VOCAB
    # The stored set is a top-k of the reference (up to ties within bf16 rounding), and each stored
    # weight is the reference probability within the ratio_q10 step (p_max / 1023) plus bf16 slack:
    # the cache ran the bf16 teacher on batches of 16 windows, the reference on 3.
    kth = probs.topk(8, dim=-1).values[..., -1:]  # (3, T, 1)
    stored_p = probs.gather(-1, batch.ids)  # (3, T, 8)
    assert bool((stored_p >= kth - 2e-3).all())
    step = probs.amax(-1, keepdim=True) / 1023
    assert bool(((batch.weights.double() - stored_p).abs() <= step + 2e-3).all())
    assert torch.allclose(batch.tail.double(), 1 - stored_p.sum(-1), atol=3e-3)
    assert verify(run / "cache", recompute=2)["ok"]

    out = train_student(config, progress=False)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.model_type == "mistral" and student.config.vocab_size == VOCAB
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab()
        == AutoTokenizer.from_pretrained(hf["tokenizer"]).get_vocab()
    )
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_each_family_as_teacher_loads_in_its_dtype(hf, prepared: Path, family: str):
    config = _config(hf, prepared, {"t": hf[family]})
    data = PreparedData.open(prepared / "data")
    ensemble = TeacherEnsemble.load(config, data, torch.device("cpu"))
    stored = torch.bfloat16 if family in ("qwen2", "mistral") else torch.float32
    assert ensemble.models[0].dtype == stored
    assert ensemble.dtypes == [str(stored).removeprefix("torch.")]
    windows = torch.from_numpy(data.windows("train")[:2].astype(np.int64))
    got = ensemble.logprobs(windows).double().exp()  # (2, T, V)
    assert got.shape == (2, SEQ_LEN, VOCAB)
    assert torch.allclose(got, _reference_probs([hf[family]], data.windows("train")[:2]), atol=1e-5)
    # teachers.NAME.dtype overrides the stored dtype.
    as_fp32 = _config(hf, prepared, {"t": hf[family]}, "teachers.t.dtype=float32")
    assert TeacherEnsemble.load(as_fp32, data, torch.device("cpu")).models[0].dtype == torch.float32


def test_padded_rows_that_would_win_never_enter_the_cache(hf, prepared: Path, tmp_path: Path):
    """A GPT-2 teacher whose padded output rows (ids >= V) get the largest logits at every position."""
    winner = tmp_path / "winner"
    save_model(winner, "gpt2", hf["tokenizer"], rows=PADDED, seed=5)
    model = AutoModelForCausalLM.from_pretrained(winner)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 8.0  # hidden[..., 0] ~ 8 at every position
        model.lm_head.weight[VOCAB:] = 0.0
        model.lm_head.weight[VOCAB:, 0] = 20.0  # padded logits ~ 160, real ones ~ 1
    model.save_pretrained(winner, safe_serialization=True)
    data = PreparedData.open(prepared / "data")
    windows = data.windows("train")[:4]
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(windows.astype(np.int64))).logits  # (4, T, 320)
    assert bool((full.argmax(-1) >= VOCAB).all())  # unmasked, a padded id would top every position

    run = _copy_run(prepared, tmp_path)
    config = _config(hf, run, {"w": winner})
    cache_logits(config, progress=False)
    reader = open_cache(run / "cache" / "logits.zarr")
    batch = reader.read_windows(np.arange(4), weights="ghost")
    assert int(batch.ids.max()) < VOCAB
    probs = full[..., :VOCAB].double().softmax(-1)  # the reference: padded ids masked out
    assert torch.equal(batch.ids.sort(-1).values, probs.topk(8, dim=-1).indices.sort(-1).values)
    assert bool(((batch.weights.double() - probs.gather(-1, batch.ids)).abs() <= 1 / 1023 + 1e-5).all())
    online = TeacherEnsemble.load(config, data, torch.device("cpu")).logprobs(
        torch.from_numpy(windows.astype(np.int64))
    )
    assert online.shape[-1] == VOCAB and torch.allclose(online.double().exp(), probs, atol=1e-5)

    # The same model as a pretrained student: its padded rows take no part in its loss either.
    student_config = _config(
        hf,
        run,
        {"w": winner},
        f"student.model.path={winner}",
        "student.model.init=pretrained",
        "student.mode=ce",
    )
    student = build_student(student_config, data).eval()  # eval: no dropout in the comparison
    assert torch.equal(student.lm_head.weight, model.lm_head.weight)  # started from the folder's weights
    objective = StudentObjective(student, LossOptions.from_config(student_config), vocab_size=VOCAB)
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            full[:, :-1, :VOCAB].flatten(0, 1), ids[:, 1:].flatten()
        )  # the CE over the tokenizer's ids only
        assert float(objective({"input_ids": ids})) == pytest.approx(float(expected), rel=1e-5)


def test_a_teacher_trained_from_a_pretrained_folder(hf, prepared: Path, tmp_path: Path):
    """teachers.NAME.model.path + init = "pretrained": train-teacher fine-tunes the folder's model."""
    from logitcache.pipeline.teachers import train_teacher

    run = _copy_run(prepared, tmp_path)
    extra = f'\n[teachers.tuned.model]\npath = "{hf["qwen2"]}"\ninit = "pretrained"\n'
    extra += "\n[teachers.tuned.train]\nbatch_size = 8\nmax_steps = 2\nlr = 1e-4\n"
    out = train_teacher(_config(hf, run, {}, extra=extra), "tuned", progress=False)
    tuned = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(hf["qwen2"], dtype=torch.float32)
    assert tuned.config.model_type == "qwen2" and tuned.config.vocab_size == PADDED
    with torch.no_grad():
        delta = (tuned.model.embed_tokens.weight - start.model.embed_tokens.weight).abs().max()
    assert 0 < float(delta) < 0.05  # two small AdamW steps away from the pretrained weights


# ----------------------------------------------------------------------------------------------
# Refusals: other tokenizers, bad families, unusable heads


def _swapped(tokenizer_model: Path, out: Path) -> tuple[Path, int, int, str, str]:
    """A copy of a model folder whose tokenizer swaps two token ids; returns (folder, id_a, id_b, tok_a, tok_b)."""
    shutil.copytree(tokenizer_model, out)
    raw = json.loads((out / "tokenizer.json").read_text())
    vocab = raw["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(raw))
    first, second = sorted((vocab[a], vocab[b]))
    by_id = {i: t for t, i in vocab.items()}
    return out, first, second, by_id[first], by_id[second]


def test_teachers_with_other_tokenizers_are_refused_naming_the_tokens(hf, prepared: Path, tmp_path: Path):
    alien, id_a, id_b, tok_a, tok_b = _swapped(hf["qwen2"], tmp_path / "alien")
    run = _copy_run(prepared, tmp_path)
    before = _tree(run)
    config = _config(hf, run, {"llama": hf["llama"], "alien": alien})
    with pytest.raises(TeacherError) as info:
        cache_logits(config, progress=False)
    message = str(info.value)
    assert "\n" not in message and "Teacher 'alien'" in message and "different tokenizer" in message
    assert f"2 of {VOCAB} token ids differ" in message
    # data's token vs the model's, for both ids (the data has tok_b at id_a after the swap's mirror)
    assert f"{id_a}: {tok_b!r} vs {tok_a!r}" in message and f"{id_b}: {tok_a!r} vs {tok_b!r}" in message
    assert _tree(run) == before  # nothing written

    # A teacher with a wholly different tokenizer (GPT-2 style: 301 ids) is refused the same way.
    other = tmp_path / "other"
    save_model(other, "gpt2", hf["gpt2_tokenizer"], rows=VOCAB)
    with pytest.raises(TeacherError, match=r"token ids differ .*: \d+: "):
        cache_logits(_config(hf, run, {"other": other}), progress=False)


def test_student_with_another_tokenizer_is_refused_before_anything_is_written(
    hf, prepared: Path, tmp_path: Path
):
    alien, id_a, _, tok_a, tok_b = _swapped(hf["mistral"], tmp_path / "alien")
    run = _copy_run(prepared, tmp_path)
    before = _tree(run)
    for init in ("random", "pretrained"):
        config = _config(
            hf, run, {}, f"student.model.path={alien}", f"student.model.init={init}", "student.mode=ce"
        )
        with pytest.raises(TeacherError) as info:
            train_student(config, progress=False)
        assert "student.model" in str(info.value) and f"{id_a}: {tok_b!r} vs {tok_a!r}" in str(info.value)
    assert _tree(run) == before


def test_student_families_and_init_are_checked(hf, prepared: Path):
    data = PreparedData.open(prepared / "data")
    qwen = _config(hf, prepared, {}, "student.model.family=qwen2", "student.model.num_kv_heads=2")
    model = build_student(qwen, data)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_key_value_heads == 2
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        32,
        2,
        VOCAB,
    )
    assert model.config.eos_token_id == data.token_ids["eos_token_id"] == VOCAB - 1
    # From a folder's config: its architecture, the data's vocabulary, a fresh seeded initialisation.
    llama = _config(hf, prepared, {}, f"student.model.path={hf['llama']}")
    first, second = build_student(llama, data), build_student(llama, data)
    assert type(first).__name__ == "LlamaForCausalLM" and first.config.vocab_size == VOCAB
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    pretrained = AutoModelForCausalLM.from_pretrained(hf["llama"])
    assert not torch.equal(
        first.model.layers[0].mlp.up_proj.weight, pretrained.model.layers[0].mlp.up_proj.weight
    )
    # init = "pretrained": the folder's weights, in float32 even when stored in bf16.
    from_qwen = build_student(
        _config(hf, prepared, {}, f"student.model.path={hf['qwen2']}", "student.model.init=pretrained"), data
    )
    stored = AutoModelForCausalLM.from_pretrained(hf["qwen2"], dtype="auto")
    assert from_qwen.dtype == torch.float32 and stored.dtype == torch.bfloat16
    assert torch.equal(from_qwen.model.embed_tokens.weight, stored.model.embed_tokens.weight.float())

    with pytest.raises(ConfigError, match="Got 'qwen'. Did you mean .*'qwen2'"):
        _config(hf, prepared, {}, "student.model.family=qwen")
    with pytest.raises(ConfigError, match="student.model.path .* with student.model.init = 'pretrained'"):
        _config(hf, prepared, {}, "student.model.init=pretrained")
    with pytest.raises(TeacherError, match="Expected student.model.path to be a Hugging Face model folder"):
        build_student(_config(hf, prepared, {}, f"student.model.path={prepared}"), data)
    with pytest.raises(TeacherError, match="positions"):  # a window longer than the model takes
        build_student(_config(hf, prepared, {}, "student.model.family=qwen2", "student.model.max_position_embeddings=16",
                              "data.seq_len=16"), PreparedData.open(prepared / "data"))  # fmt: skip


def test_a_student_whose_logits_are_not_its_output_layer_is_refused(hf, prepared: Path, tmp_path: Path):
    """Logit soft-capping (Gemma 2) makes logits != hidden @ W.T: the fused loss would train other logits."""
    data = PreparedData.open(prepared / "data")
    config = _config(
        hf,
        prepared,
        {},
        "student.model.family=gemma2",
        "student.model.num_kv_heads=2",
    )
    with pytest.raises(ConfigError, match="Expected student.model to compute its logits as its output layer"):
        build_student(config, data)


# ----------------------------------------------------------------------------------------------
# cache-logits --dry-run


def test_dry_run_writes_nothing_and_estimates_the_real_cache(hf, prepared: Path, tmp_path: Path):
    run = _copy_run(prepared, tmp_path)
    config = _config(hf, run, {"llama": hf["llama"], "gpt": hf["gpt2"]})
    before = _tree(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*PIPE, "cache-logits", str(tmp_path / "run.toml"), "--dry-run"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tree(run) == before and not (run / "cache").exists()
    estimate = dry_run(config)
    assert _tree(run) == before
    windows = PreparedData.open(run / "data").manifest["splits"]["train"]["windows"]
    assert estimate.positions == windows * SEQ_LEN and estimate.timed_batches == 3
    assert estimate.estimated_seconds > 0 and estimate.sampled_windows == min(windows, 4 * 16)
    out = done.stdout
    assert f"positions: {estimate.positions:,}" in out
    assert "estimated size: " in out and "bytes/position" in out and "estimated time: " in out
    assert "warm-up" in out and "nothing written" in out
    # The printed size is the one dry_run computes (same sample windows, same encoding).
    printed = int(out.split("estimated size: ")[1].split(" bytes")[0].replace(",", ""))
    assert printed == pytest.approx(estimate.estimated_bytes, rel=0.02)

    cache_logits(config, progress=False)
    summary = json.loads((run / "cache" / "COMPLETE.json").read_text())["summary"]
    ratio = estimate.estimated_bytes / summary["stored_bytes"]
    assert 0.5 < ratio < 2.0, (estimate.estimated_bytes, summary["stored_bytes"])
    assert estimate.raw_bytes >= summary["stored_bytes"] * 0.9  # compression does not grow the data much
    assert dry_run(config).complete


def test_dry_run_needs_prepared_data(hf, tmp_path: Path):
    _config(hf, tmp_path / "run", {"llama": hf["llama"]})
    done = subprocess.run(
        [*PIPE, "cache-logits", str(tmp_path / "run.toml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: Expected prepared data")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
