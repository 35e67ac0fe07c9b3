"""`pipe report`: figures and a self-contained HTML page from training metrics and evaluation results."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from logitcache.pipeline.cli import main
from logitcache.pipeline.errors import DataError, StageError
from logitcache.pipeline.evaluation.evaluate import RESULTS_FORMAT, RESULTS_VERSION, write_results
from logitcache.pipeline.evaluation.report import build_report, read_training_curves

pytest.importorskip("matplotlib")


def write_metrics(
    model_dir: Path, losses: list[float], dev_losses: list[float], steps_per_epoch: int
) -> None:
    model_dir.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(losses, start=1):
        lines.append(
            {"step": i, "epoch": (i - 1) // steps_per_epoch, "loss": loss, "lr": 1e-3, "tokens": 64 * i}
        )
        if i % steps_per_epoch == 0:
            epoch = i // steps_per_epoch - 1
            lines.append({"step": i, "epoch": epoch, "dev_loss": dev_losses[epoch]})
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (model_dir / "config.json").write_text("{}")


def model_entry(name: str, accuracy: float, ece: float) -> dict:
    counts = [0] * 15
    counts[0], counts[3], counts[14] = 700, 250, 50
    paradigms = {
        "anaphor_gender_agreement": ("anaphor_agreement", "morphology"),
        "adjunct_island": ("island_effects", "syntax"),
        "existential_there_quantifiers_1": ("quantifiers", "semantics"),
    }
    return {
        "name": name,
        "path": f"/runs/x/{name}",
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "parameters": 123_456,
        "seconds": 1.0,
        "held_out": {
            "split": "test",
            "windows": 10,
            "tokens": 1000,
            "loss": 4.0,
            "perplexity": 54.598,
            "ece": ece,
            "reliability": {
                "ece": ece,
                "total": 1000,
                "edges": [b / 15 for b in range(16)],
                "count": counts,
                "confidence": [
                    0.03 if c and b == 0 else (b + 0.5) / 15 if c else None for b, c in enumerate(counts)
                ],
                "accuracy": [
                    0.02 if c and b == 0 else 0.2 if b == 3 else 0.9 if c else None
                    for b, c in enumerate(counts)
                ],
            },
        },
        "blimp": {
            "overall": accuracy,
            "pairs": 30,
            "fields": {"morphology": accuracy, "syntax": accuracy, "semantics": accuracy},
            "phenomena": {p: accuracy for p, _ in paradigms.values()},
            "paradigms": {
                uid: {
                    "accuracy": accuracy,
                    "pairs": 10,
                    "correct": round(10 * accuracy),
                    "ties": 0,
                    "linguistics_term": p,
                    "field": f,
                }
                for uid, (p, f) in paradigms.items()
            },
        },
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_metrics(run / "teachers" / "llama", [7.0 - 0.1 * i for i in range(20)], [6.0, 5.5], 10)
    write_metrics(run / "students" / "distilled", [7.5 - 0.1 * i for i in range(30)], [6.5, 6.0, 5.8], 10)
    return run


def write_eval(run: Path) -> None:
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "provenance": {},
        "settings": {"split": "test"},
        "models": [model_entry("teachers/llama", 0.6, 0.05), model_entry("students/distilled", 0.7, 0.02)],
    }
    write_results(results, run / "eval" / "results.json")


def embedded_images(page: str) -> list[bytes]:
    return [
        base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    ]


def test_report_holds_every_figure_inline(run_dir: Path, capsys):
    write_eval(run_dir)
    main(["report", str(run_dir)])
    assert capsys.readouterr().out.strip() == f"report: {run_dir / 'eval' / 'report.html'}"
    page = (run_dir / "eval" / "report.html").read_text()
    figures = run_dir / "eval" / "figures"
    names = ["training_curves.png", "blimp_phenomena.png", "reliability.png"]
    # Self-contained: the three PNGs inline, byte for byte, and nothing fetched from elsewhere.
    assert embedded_images(page) == [(figures / name).read_bytes() for name in names]
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    import matplotlib.image

    for name in names:
        pixels = matplotlib.image.imread(figures / name)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels.std() > 0.05  # a drawn figure
    # The tables carry the numbers.
    for text in (
        "teachers/llama",
        "students/distilled",
        "54.60",
        "0.0500",
        "0.0200",
        "60.0",
        "70.0",
        "123,456",
    ):
        assert text in page
    assert "adjunct_island" in page  # per-paradigm table


def test_report_without_results_draws_the_training_curves(run_dir: Path):
    page = build_report(run_dir).read_text()
    assert len(embedded_images(page)) == 1
    assert "No evaluation results" in page and "No BLiMP results" in page
    curves = read_training_curves(run_dir / "students" / "distilled")
    assert curves.name == "students/distilled"
    assert curves.steps == list(range(1, 31)) and curves.dev_epochs == [1, 2, 3]
    assert curves.dev_losses == [6.5, 6.0, 5.8] and curves.dev_steps == [10, 20, 30]


def test_report_errors(tmp_path: Path, run_dir: Path, capsys):
    with pytest.raises(StageError, match="Expected a run directory"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="Found neither"):
        build_report(tmp_path / "empty")
    with pytest.raises(DataError, match="Expected evaluation results at"):
        build_report(run_dir, results_path=tmp_path / "missing.json")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="Expected a logitcache-eval results JSON"):
        build_report(run_dir)
    metrics = run_dir / "teachers" / "llama" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "{broken\n")
    with pytest.raises(SystemExit):
        main(["report", str(run_dir)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:23: expected a JSON object" in err
