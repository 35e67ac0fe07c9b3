"""`pipe evaluate`: BLiMP scores against transformers log-probs, held-out loss/ECE against NumPy, the JSON, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.pipeline.cli import main
from logitcache.pipeline.config import ModelConfig, load_config
from logitcache.pipeline.errors import ConfigError, DataError, LogitcacheError, TeacherError
from logitcache.pipeline.evaluation.blimp import (
    blimp_accuracy,
    encode_sentences,
    evaluate_blimp,
    read_blimp,
    sentence_log_probs,
    sentence_log_probs_reference,
    subset_per_paradigm,
)
from logitcache.pipeline.evaluation.compare import headline_lines
from logitcache.pipeline.evaluation.evaluate import EvalOptions, evaluate_models, evaluate_run, read_results
from logitcache.pipeline.evaluation.heldout import evaluate_held_out
from logitcache.pipeline.evaluation.loading import load_tokenizer
from logitcache.pipeline.models import build_model, count_parameters
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.tokenizer import BOS_ID, load_hf_tokenizer, train_bpe

from .conftest import REPO, corpus_slice, write_config

BLIMP_MINI = REPO / "tests" / "fixtures" / "blimp_mini"
BLIMP_DEV = REPO.parent / "shared" / "data" / "blimp-dev"  # development copy, absent for most users

TINY_MODELS = {
    "llama": ModelConfig(
        family="llama",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ),
    "gpt2": ModelConfig(
        family="gpt2",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    ),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_sources: list[str]) -> PreparedData:
    """Prepared data (vocab 512, 32-token windows) from four ~40k-character slices of the real corpus."""
    root = tmp_path_factory.mktemp("evalrun")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in corpus_sources[:4]:
        (corpus / name.removesuffix(".gz")).write_text(corpus_slice(name, 40_000), encoding="utf-8")
    config = load_config(write_config(root / "tiny.toml", corpus, root / "run"))
    return PreparedData.open(prepare_data(config, progress=False))


def save_tiny_model(out: Path, family: str, data: PreparedData, *, seed: int = 0) -> Path:
    """A random model with weights drawn wide enough (std 0.2) that its predictions are far from uniform."""
    model = build_model(TINY_MODELS[family], vocab_size=data.vocab_size, seq_len=data.seq_len, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    load_hf_tokenizer(data.tokenizer_path).save_pretrained(out)
    shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def model_dirs(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(root / family, family, prepared) for family in TINY_MODELS}


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def transformers_score(model, tokenizer, sentence: str) -> float:
    """Directly with transformers: tokenizer(sentence) prepends <s>; sum log p of every later token."""
    inputs = tokenizer(sentence, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert ids[0] == BOS_ID
    with torch.no_grad():
        log_probs = model(**inputs).logits.log_softmax(-1)[0]  # (L, V)
    return sum(float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids)))


# ----------------------------------------------------------------------------------------------
# BLiMP


def test_read_blimp_reads_the_native_format():
    pairs = read_blimp(BLIMP_MINI)
    assert len(pairs) == 11
    assert [p.paradigm for p in pairs].count("regular_plural_subject_verb_agreement_1") == 4
    first = pairs[0]  # files in name order
    assert (first.good, first.bad) == ("Sarah sold these books.", "Sarah sold these book.")
    assert (first.paradigm, first.phenomenon, first.field) == (
        "determiner_noun_agreement_1",
        "determiner_noun_agreement",
        "morphology",
    )
    assert first.source.endswith("determiner_noun_agreement_1.jsonl:1")


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_sentence_scores_match_log_probs_from_transformers(model_dirs: dict[str, Path], family: str):
    model, tokenizer = load(model_dirs[family])
    pairs = read_blimp(BLIMP_MINI)
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    # The explicit BOS equals what the data's tokenizer prepends itself.
    assert encode_sentences(tokenizer, sentences) == [tokenizer(s)["input_ids"] for s in sentences]
    batched = sentence_log_probs(model, tokenizer, sentences, batch_size=7)  # lengths mixed within batches
    direct = np.array([transformers_score(model, tokenizer, s) for s in sentences])
    # float32 forward passes (batched with padding and a mask vs. one unpadded sentence): per-token
    # log-probs agree to ~1e-6; sums of ~10 tokens of magnitude ~10 stay well inside 1e-4.
    np.testing.assert_allclose(batched, direct, rtol=0, atol=1e-4)
    assert np.all(direct < 0) and np.ptp(direct) > 1.0  # real, varied scores, not a degenerate model
    reference = [sentence_log_probs_reference(model, tokenizer, s) for s in sentences]
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_padding_does_not_change_scores(model_dirs: dict[str, Path], family: str):
    model, tokenizer = load(model_dirs[family])
    sentences = [
        "A cat.",
        "The teachers walk to school every single day of the week.",
        "Who did the man see?",
    ]
    one_by_one = sentence_log_probs(model, tokenizer, sentences, batch_size=1)
    together = sentence_log_probs(model, tokenizer, sentences, batch_size=64)  # short ones padded
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=1e-5)
    tokenizer.pad_token_id = 5  # whatever id fills the padding, the scores stay
    np.testing.assert_allclose(sentence_log_probs(model, tokenizer, sentences), one_by_one, rtol=0, atol=1e-5)


def test_accuracies_from_hand_set_scores():
    pairs = read_blimp(BLIMP_MINI)
    by_paradigm = {
        "determiner_noun_agreement_1": [(-1, -2), (-3, -2), (-5, -5)],  # right, wrong, tie -> 1/3
        "existential_there_quantifiers_1": [(-1, -2), (-1, -2)],  # 2/2
        "regular_plural_subject_verb_agreement_1": [(-1, -2), (-1, -2), (-1, -2), (-2, -1)],  # 3/4
        "wh_questions_object_gap": [(-2, -1), (-4, -4)],  # wrong, tie -> 0/2
    }
    cursor = {uid: 0 for uid in by_paradigm}
    good, bad = [], []
    for pair in pairs:
        g, b = by_paradigm[pair.paradigm][cursor[pair.paradigm]]
        cursor[pair.paradigm] += 1
        good.append(g)
        bad.append(b)
    result = blimp_accuracy(pairs, np.array(good, float), np.array(bad, float))
    assert result.paradigms["determiner_noun_agreement_1"].accuracy == pytest.approx(1 / 3)
    assert result.paradigms["determiner_noun_agreement_1"].ties == 1
    assert result.paradigms["wh_questions_object_gap"].correct == 0
    assert result.paradigms["wh_questions_object_gap"].ties == 1
    # Unweighted mean over the 4 paradigms (pooled over pairs it would be 6/11 = 0.545).
    assert result.overall == pytest.approx((1 / 3 + 1 + 3 / 4 + 0) / 4)
    assert result.fields == pytest.approx(
        {"morphology": (1 / 3 + 3 / 4) / 2, "semantics": 1.0, "syntax": 0.0}
    )
    assert result.phenomena["subject_verb_agreement"] == pytest.approx(0.75)
    assert result.phenomena["filler_gap_dependency"] == 0.0
    assert result.to_dict()["paradigms"]["wh_questions_object_gap"]["pairs"] == 2


def test_evaluate_blimp_counts_the_transformers_scores(model_dirs: dict[str, Path]):
    model, tokenizer = load(model_dirs["llama"])
    pairs = read_blimp(BLIMP_MINI)
    result = evaluate_blimp(model, tokenizer, pairs, batch_size=5)
    good = np.array([transformers_score(model, tokenizer, p.good) for p in pairs])
    bad = np.array([transformers_score(model, tokenizer, p.bad) for p in pairs])
    np.testing.assert_allclose(result.good_scores, good, atol=1e-4)
    np.testing.assert_allclose(result.bad_scores, bad, atol=1e-4)
    assert np.min(np.abs(good - bad)) > 1e-3  # no pair so close that the tolerance could flip it
    expected = blimp_accuracy(pairs, good, bad)
    assert result.overall == expected.overall
    assert result.paradigms == expected.paradigms


# ----------------------------------------------------------------------------------------------
# Held-out perplexity and calibration


def numpy_held_out(model, windows: np.ndarray, num_bins: int = 15) -> tuple[float, float]:
    """Reference: one window at a time, float64 log-softmax in NumPy, ECE by explicit bin comparisons."""
    nll, confidence, correct = [], [], []
    for window in windows.astype(np.int64):
        with torch.no_grad():
            logits = (
                model(input_ids=torch.from_numpy(window[None])).logits[0, :-1].double().numpy()
            )  # (T-1, V)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        targets = window[1:]
        nll.extend(-log_probs[np.arange(len(targets)), targets])
        confidence.extend(np.exp(log_probs.max(-1)))
        correct.extend(log_probs.argmax(-1) == targets)
    confidence, correct = np.array(confidence), np.array(correct, dtype=float)
    ece = 0.0
    for b in range(num_bins):
        members = (confidence > b / num_bins) & (confidence <= (b + 1) / num_bins)
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(np.mean(nll)), ece


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_held_out_loss_perplexity_and_ece_match_numpy(prepared: PreparedData, model_dirs, family: str):
    model, _ = load(model_dirs[family])
    windows = prepared.windows("test")
    assert windows.shape[0] >= 5
    metrics = evaluate_held_out(model, windows, split="test", batch_size=4)
    loss, ece = numpy_held_out(model, windows)
    assert metrics.tokens == windows.shape[0] * (windows.shape[1] - 1)
    assert metrics.loss == pytest.approx(loss, rel=1e-5)  # float32 forward, float64 sums
    assert metrics.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics.calibration.ece == pytest.approx(ece, abs=1e-5)
    assert sum(metrics.calibration.count) == metrics.tokens
    again = evaluate_held_out(model, windows, split="test", batch_size=64)
    assert again.loss == pytest.approx(metrics.loss, rel=1e-6)
    assert again.calibration.count == metrics.calibration.count


# ----------------------------------------------------------------------------------------------
# The results document and the command line


def test_evaluate_command_writes_every_number(prepared: PreparedData, model_dirs, tmp_path: Path, capsys):
    out = tmp_path / "results.json"
    main(
        [
            "evaluate",
            str(model_dirs["llama"]),
            str(model_dirs["gpt2"]),
            "--data",
            str(prepared.root),
            "--blimp",
            str(BLIMP_MINI),
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--random-twins",
        ]
    )
    captured = capsys.readouterr()
    assert "llama: test perplexity" in captured.err and "BLiMP" in captured.err
    assert "random-init/llama: test perplexity" in captured.err
    results = read_results(out)
    assert results["settings"]["split"] == "test"
    assert results["settings"]["blimp_pairs"] == 11 and results["settings"]["blimp_paradigms"] == 4
    assert {"torch", "transformers", "python"} <= set(results["provenance"]["versions"])
    assert [m["name"] for m in results["models"]] == ["llama", "gpt2"]
    for entry, family in zip(results["models"], ("llama", "gpt2"), strict=True):
        model, tokenizer = load(model_dirs[family])
        assert entry["parameters"] == count_parameters(model)
        assert entry["path"] == str(model_dirs[family].resolve())
        held_out = entry["held_out"]
        loss, ece = numpy_held_out(model, prepared.windows("test"))
        assert held_out["loss"] == pytest.approx(loss, rel=1e-5)
        assert held_out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert held_out["ece"] == pytest.approx(ece, abs=1e-5)
        assert len(held_out["reliability"]["count"]) == 15
        blimp = entry["blimp"]
        pairs = read_blimp(BLIMP_MINI)
        good = np.array([transformers_score(model, tokenizer, p.good) for p in pairs])
        bad = np.array([transformers_score(model, tokenizer, p.bad) for p in pairs])
        expected = blimp_accuracy(pairs, good, bad)
        assert blimp["overall"] == pytest.approx(expected.overall)
        assert blimp["fields"] == pytest.approx(expected.fields)
        assert blimp["phenomena"] == pytest.approx(expected.phenomena)
        assert set(blimp["paradigms"]) == set(expected.paradigms)

    # Without --out the JSON goes to stdout; --split dev and BLiMP alone work too.
    main(["evaluate", str(model_dirs["llama"]), "--blimp", str(BLIMP_MINI), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"][0]["held_out"] is None
    assert printed["models"][0]["blimp"]["overall"] == results["models"][0]["blimp"]["overall"]


def test_evaluate_run_finds_the_models_of_a_run(prepared: PreparedData, model_dirs, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(prepared.root, run / "data")
    shutil.copytree(model_dirs["llama"], run / "teachers" / "llama")
    shutil.copytree(model_dirs["gpt2"], run / "students" / "distilled")
    (run / "teachers" / "not-a-model").mkdir()  # ignored: no config.json
    path = evaluate_run(run, options=EvalOptions(split="dev", batch_size=16))
    assert path == run / "eval" / "results.json"
    results = read_results(path)
    assert [m["name"] for m in results["models"]] == ["teachers/llama", "students/distilled"]
    assert results["models"][0]["held_out"]["split"] == "dev"
    assert results["models"][0]["blimp"] is None


def test_evaluate_run_includes_teachers_outside_the_run(prepared: PreparedData, model_dirs, tmp_path: Path):
    # A teacher given by `teachers.NAME.path` (e.g. a pretrained model) lives outside RUN/teachers.
    run = tmp_path / "run"
    shutil.copytree(prepared.root, run / "data")
    shutil.copytree(model_dirs["gpt2"], run / "students" / "distilled")
    outside = tmp_path / "pretrained-llama"
    shutil.copytree(model_dirs["llama"], outside)
    teachers = {"big": outside, "missing": tmp_path / "nowhere"}  # a folder without a model is skipped
    path = evaluate_run(run, options=EvalOptions(split="dev", batch_size=16), teachers=teachers)
    results = read_results(path)
    assert [m["name"] for m in results["models"]] == ["teachers/big", "students/distilled"]
    assert results["models"][0]["path"] == str(outside.resolve())
    direct = evaluate_models(
        [outside], options=EvalOptions(data_dir=run / "data", split="dev", batch_size=16)
    )
    assert results["models"][0]["held_out"]["loss"] == direct["models"][0]["held_out"]["loss"]


def test_a_model_without_tokenizer_uses_the_data_tokenizer(
    prepared: PreparedData, model_dirs, tmp_path: Path
):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dirs["llama"] / name, bare / name)
    options = EvalOptions(data_dir=prepared.root, blimp_dir=BLIMP_MINI, device="cpu")
    with_tok = evaluate_models([model_dirs["llama"]], options=options)["models"][0]
    without = evaluate_models([bare], options=options)["models"][0]
    assert without["blimp"]["overall"] == with_tok["blimp"]["overall"]
    assert without["held_out"]["loss"] == with_tok["held_out"]["loss"]
    with pytest.raises(TeacherError, match="Expected a tokenizer in"):
        load_tokenizer(bare)


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors


def run_cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *args, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_and_non_causal_model_dirs(tmp_path: Path, capsys):
    err = run_cli_error(capsys, str(tmp_path / "nowhere"), "--blimp", str(BLIMP_MINI))
    assert "Expected a model directory" in err
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    err = run_cli_error(capsys, str(vit), "--blimp", str(BLIMP_MINI))
    assert "causal language model" in err and "ViTConfig" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "causal language model" in run_cli_error(capsys, str(broken), "--blimp", str(BLIMP_MINI))


def test_blimp_directory_errors(tmp_path: Path, model_dirs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pairs here")
    err = run_cli_error(capsys, str(model_dirs["llama"]), "--blimp", str(empty))
    assert "Expected BLiMP .jsonl files" in err
    assert "Expected a directory" in run_cli_error(
        capsys, str(model_dirs["llama"]), "--blimp", str(tmp_path / "no")
    )

    bad = tmp_path / "bad"
    bad.mkdir()
    good_line = (BLIMP_MINI / "wh_questions_object_gap.jsonl").read_text().splitlines()[0]
    (bad / "p.jsonl").write_text(good_line + "\n\n" + '{"sentence_good": "A.", "sentence_bad": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:3: expected a JSON object\. Got invalid JSON"):
        read_blimp(bad)
    (bad / "p.jsonl").write_text(
        good_line + "\n" + json.dumps({"sentence_good": "A.", "sentence_bad": "B."}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"p\.jsonl:2: expected the fields .* Missing UID, field, linguistics_term"
    ):
        read_blimp(bad)
    (bad / "p.jsonl").write_text(good_line.replace('"syntax"', '"semantics"') + "\n" + good_line + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected paradigm 'wh_questions_object_gap' to keep"):
        read_blimp(bad)
    err = run_cli_error(capsys, str(model_dirs["llama"]), "--blimp", str(bad))
    assert "p.jsonl:2" in err


def test_tokenizer_or_vocabulary_mismatch_with_the_data(
    prepared: PreparedData, model_dirs, corpus_sources: list[str], tmp_path: Path, capsys
):
    # Same model, another tokenizer of the same size (trained on other text): ids mean other strings.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(model_dirs["llama"], other)
    tokenizer = train_bpe(
        [corpus_slice(corpus_sources[-1], 30_000)], vocab_size=prepared.vocab_size, min_frequency=1
    )
    tokenizer.save(str(other / "tokenizer.json"))
    load_hf_tokenizer(other / "tokenizer.json").save_pretrained(other)
    err = run_cli_error(capsys, str(other), "--data", str(prepared.root))
    assert "uses a different tokenizer than the prepared data" in err

    # A model whose output layer is smaller than the data's vocabulary.
    small = tmp_path / "small-vocab"
    model = build_model(TINY_MODELS["llama"], vocab_size=100, seq_len=32, seed=0)
    model.save_pretrained(small)
    err = run_cli_error(capsys, str(small), "--data", str(prepared.root))
    assert "Got an output layer of 100 tokens" in err


def test_option_errors(model_dirs, prepared: PreparedData):
    with pytest.raises(ConfigError, match="Expected --data .* or --blimp"):
        evaluate_models([model_dirs["llama"]], options=EvalOptions())
    with pytest.raises(ConfigError, match="at least one model"):
        evaluate_models([], options=EvalOptions(blimp_dir=BLIMP_MINI))
    with pytest.raises(LogitcacheError, match="Expected prepared data"):
        evaluate_models([model_dirs["llama"]], options=EvalOptions(data_dir=BLIMP_MINI))


# ----------------------------------------------------------------------------------------------
# The development copy of BLiMP (67 paradigms x 300 pairs), when present


@pytest.mark.slow
@pytest.mark.skipif(not BLIMP_DEV.is_dir(), reason=f"no BLiMP development data at {BLIMP_DEV}")
def test_blimp_dev_data(model_dirs):
    pairs = read_blimp(BLIMP_DEV)
    paradigms = {p.paradigm for p in pairs}
    assert len(paradigms) == 67 and len(pairs) == 67 * 300
    assert {p.field for p in pairs} >= {"morphology", "syntax", "semantics"}
    model, tokenizer = load(model_dirs["llama"])
    subset = [p for p in pairs if p.paradigm in sorted(paradigms)[:3]]
    result = evaluate_blimp(model, tokenizer, subset, batch_size=128)
    assert len(result.paradigms) == 3 and all(r.pairs == 300 for r in result.paradigms.values())
    some = subset[::100]
    direct = [transformers_score(model, tokenizer, p.good) for p in some]
    np.testing.assert_allclose(result.good_scores[::100], direct, atol=1e-4)


def test_blimp_subset_is_a_fixed_sample_per_paradigm():
    pairs = read_blimp(BLIMP_DEV)
    subset = subset_per_paradigm(pairs, 100)
    counts: dict[str, int] = {}
    for pair in subset:
        counts[pair.paradigm] = counts.get(pair.paradigm, 0) + 1
    assert len(counts) == 67 and set(counts.values()) == {100}
    positions = {id(p): i for i, p in enumerate(pairs)}
    assert [positions[id(p)] for p in subset] == sorted(positions[id(p)] for p in subset)  # file order kept
    assert subset == subset_per_paradigm(pairs, 100)  # the same pairs every time
    first = [p for p in subset if p.paradigm == pairs[0].paradigm]
    assert first != [p for p in pairs if p.paradigm == pairs[0].paradigm][:100]  # a sample, not the head
    assert subset_per_paradigm(pairs, 100, seed=1) != subset
    assert subset_per_paradigm(pairs, 0) == pairs and subset_per_paradigm(pairs, 1000) == pairs


def test_evaluate_section_of_the_config(tmp_path: Path, small_corpus: Path):
    config_path = write_config(
        tmp_path / "c.toml",
        small_corpus,
        tmp_path / "run",
        extra='\n[evaluate]\nblimp_dir = "blimp"\nsplit = "dev"\nrandom_twins = true\n',
    )
    config = load_config(config_path)
    assert config.evaluate.blimp_dir == str(tmp_path / "blimp")  # relative to the config file
    options = EvalOptions.from_config(config)
    assert options.data_dir == tmp_path / "run" / "data"
    assert options.blimp_dir == tmp_path / "blimp"
    assert (options.split, options.batch_size, options.ece_bins, options.random_twins) == (
        "dev",
        32,
        15,
        True,
    )
    assert not EvalOptions.from_config(load_config(config_path, ["evaluate.random_twins=false"])).random_twins
    assert EvalOptions.from_config(load_config(config_path, ["evaluate.blimp_dir="])).blimp_dir is None


# ----------------------------------------------------------------------------------------------
# References of a run: the teachers' ensemble and a unigram model


def test_references_match_a_direct_computation(prepared: PreparedData, model_dirs, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(prepared.root, run / "data")
    for name, family in (("llama", "llama"), ("gpt", "gpt2")):
        shutil.copytree(model_dirs[family], run / "teachers" / name)
    config = load_config(write_config(tmp_path / "c.toml", tmp_path, run))
    assert sorted(config.teachers) == ["gpt", "llama"]
    teachers = {name: run / "teachers" / name for name in config.teachers}
    results = read_results(
        evaluate_run(run, options=EvalOptions(split="dev", batch_size=16), teachers=teachers, config=config)
    )
    references = {r["name"]: r["held_out"] for r in results["references"]}
    assert sorted(references) == ["teachers/ensemble", "unigram"]

    dev = torch.from_numpy(prepared.windows("dev").astype(np.int64))
    targets = dev[:, 1:]
    with torch.no_grad():  # mean of the two teachers' logits, then log-softmax (cache.ensemble = mean_logits)
        mean_logits = sum(load(run / "teachers" / f)[0](input_ids=dev).logits for f in ("llama", "gpt")) / 2
    logp = mean_logits[:, :-1].double().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert references["teachers/ensemble"]["loss"] == pytest.approx(float(-logp.mean()), rel=1e-5)
    assert references["teachers/ensemble"]["tokens"] == targets.numel()

    train = prepared.windows("train")[:, 1:].reshape(-1).astype(np.int64)
    counts = np.bincount(train, minlength=prepared.vocab_size).astype(np.float64) + 1.0
    unigram_loss = -np.log(counts / counts.sum())[targets.numpy()].mean()
    assert references["unigram"]["loss"] == pytest.approx(unigram_loss, rel=1e-6)
    lines = headline_lines(results)
    assert any(line.startswith("weakest teacher teachers/") and "unigram" in line for line in lines)


def test_headline_lines_compare_students_with_the_ce_twin_and_the_teachers():
    def entry(name: str, perplexity: float) -> dict:
        return {"name": name, "held_out": {"split": "test", "perplexity": perplexity}}

    results = {
        "models": [
            entry("teachers/llama", 318.0),
            entry("teachers/gpt2", 260.0),
            entry("students/cache", 240.0),
            entry("students/ce", 266.0),
            entry("students/online", 236.0),
        ],  # fmt: skip
        "references": [entry("teachers/ensemble", 250.0), entry("unigram", 800.0)],
    }
    assert headline_lines(results) == [
        "students/cache: test perplexity 240.00 vs 266.00 for students/ce (-9.8%)",
        "students/online: test perplexity 236.00 vs 266.00 for students/ce (-11.3%)",
        "best student students/online (236.00) vs best teacher teachers/gpt2 (260.00): -9.2%; "
        "vs the teachers' ensemble (250.00): -5.6%",
        "weakest teacher teachers/llama (318.00) vs a unigram model (800.00): -60.2%",
    ]
    assert headline_lines({"models": [entry("students/ce", 266.0)]}) == []


def test_headline_lines_read_blimp_against_the_ce_twin_and_random_twins():
    def entry(name: str, blimp: float) -> dict:
        return {"name": name, "held_out": None, "blimp": {"overall": blimp}}

    results = {
        "models": [entry("teachers/llama", 0.61), entry("students/cache", 0.58), entry("students/ce", 0.565)],
        "random_twins": [
            {**entry("random-init/teachers/llama", 0.5), "twin_of": ["teachers/llama"]},
            {**entry("random-init/students/cache", 0.52), "twin_of": ["students/cache", "students/ce"]},
            {"name": "random-init/x", "twin_of": ["x"], "blimp": None},
        ],
    }
    assert headline_lines(results) == [
        "students/cache: BLiMP 58.0 % vs 56.5 % for students/ce (+1.5 points)",
        "teachers/llama: BLiMP 61.0 % vs 50.0 % for its random-init twin (+11.0 points)",
        "students/cache: BLiMP 58.0 % vs 52.0 % for its random-init twin (+6.0 points)",
        "students/ce: BLiMP 56.5 % vs 52.0 % for its random-init twin (+4.5 points)",
    ]


def test_random_twins_score_an_untrained_model_per_architecture(
    prepared: PreparedData, model_dirs, tmp_path: Path
):
    """One twin per distinct configuration (two folders of one architecture share it), initialised
    by ``from_config`` under seed 0 and scored like a model: checked against a direct computation."""
    llama_again = shutil.copytree(model_dirs["llama"], tmp_path / "llama-again")
    dirs = [model_dirs["llama"], llama_again, model_dirs["gpt2"]]
    blimp = REPO / "data" / "blimp-dev"
    options = EvalOptions(data_dir=prepared.root, blimp_dir=blimp, blimp_pairs=2, random_twins=True)
    results = evaluate_models(dirs, options=options, progress=False)
    twins = results["random_twins"]
    assert [t["name"] for t in twins] == ["random-init/llama", "random-init/gpt2"]
    assert twins[0]["twin_of"] == ["llama", "llama-again"] and twins[1]["twin_of"] == ["gpt2"]
    windows = prepared.windows("test")
    pairs = subset_per_paradigm(read_blimp(blimp), 2)
    for twin, source in zip(twins, (model_dirs["llama"], model_dirs["gpt2"]), strict=True):
        torch.manual_seed(0)
        untrained = AutoModelForCausalLM.from_config(
            AutoModelForCausalLM.from_pretrained(source).config
        ).eval()
        trained, tokenizer = load(source)
        assert twin["parameters"] == count_parameters(trained) == count_parameters(untrained)
        loss, ece = numpy_held_out(untrained, windows)
        assert twin["held_out"]["loss"] == pytest.approx(loss, rel=1e-5)
        assert twin["held_out"]["ece"] == pytest.approx(ece, abs=1e-5)
        assert twin["held_out"]["loss"] != pytest.approx(numpy_held_out(trained, windows)[0], rel=1e-3)
        good = [transformers_score(untrained, tokenizer, p.good) for p in pairs]
        bad = [transformers_score(untrained, tokenizer, p.bad) for p in pairs]
        right = np.array(good) > np.array(bad)
        paradigms = sorted({p.paradigm for p in pairs})
        expected = np.mean([right[[p.paradigm == u for p in pairs]].mean() for u in paradigms])
        assert twin["blimp"]["overall"] == pytest.approx(expected, abs=1e-9)
    assert "random_twins" not in evaluate_models(
        dirs[:1], options=EvalOptions(data_dir=prepared.root), progress=False
    )
