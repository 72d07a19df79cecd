"""mxdit compare-perf: the SGLang-style markdown report from fixed perf JSON files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxdit.cli import main
from mxdit.tools.compare_perf import compare_files, load_perf, stage_status, summary_status

DATA = Path(__file__).parent / "data"
BASE, NEW = DATA / "perf_base.json", DATA / "perf_new.json"
SG_BASE, SG_NEW, SG_LEGACY = DATA / "sglang_baseline.json", DATA / "sglang_new.json", DATA / "sglang_legacy_steps.json"


def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_two_file_report_rows():
    out = compare_files([BASE, NEW], now="NOW")
    lines = _lines(out)
    assert lines[0] == "### Performance Comparison Report"
    assert "#### 1. High-level Summary" in lines and "#### 2. Stage Breakdown" in lines
    assert lines.index("#### 1. High-level Summary") < lines.index("#### 2. Stage Breakdown")
    expected_rows = [
        "| Metric | Baseline | New | Diff | Status |",
        "| **E2E Latency** | 10000.00 ms | 8000.00 ms | **-2000.00 ms (-20.0%)** | ✅ (Faster) |",
        "| **Denoising** | 9000.00 ms | 7000.00 ms | **-2000.00 ms (-22.2%)** | ✅ (Faster) |",
        "| **Peak Memory (device)** | 20.00 GiB | 10.00 GiB | **-10.00 GiB (-50.0%)** | ✅ (Lower) |",
        "| **Throughput** | 0.10 req/s | 0.12 req/s | - | - |",
        "| Stage Name | Baseline (ms) | New (ms) | Diff (ms) | Diff (%) | Status |",
        "| InputValidationStage | 1.00 | 1.20 | +0.20 | +20.0% | ⚪️ |",
        "| TextEncodingStage | 500.00 | 480.00 | -20.00 | -4.0% | ⚪️ |",
        "| DenoisingStage | 9000.00 | 7000.00 | -2000.00 | -22.2% | 🟢 |",
        "| Denoising Loop (4 steps) | 9000.00 | 7000.00 | -2000.00 | -22.2% | 🟢 |",
        "| ↳ transformer (2 steps) | 4500.00 | 3500.00 | -1000.00 | -22.2% | 🟢 |",
        "| ↳ transformer_2 (2 steps) | 4500.00 | 3500.00 | -1000.00 | -22.2% | 🟢 |",
        "| DecodingStage | 496.00 | 1000.00 | +504.00 | +101.6% | 🔴 |",
    ]
    for row in expected_rows:
        assert row in lines, row
    # execution order, the loop (and its experts) right after the denoising stage
    names = [l.split(" | ")[0][2:] for l in lines if l.startswith("| ") and "ms" not in l.split(" | ")[0]]
    stage_names = names[names.index("Stage Name") + 2:]
    assert stage_names == [
        "InputValidationStage", "TextEncodingStage", "LatentPreparationStage", "TimestepPreparationStage", "DenoisingStage",
        "Denoising Loop (4 steps)", "↳ transformer (2 steps)", "↳ transformer_2 (2 steps)", "DecodingStage",
    ]
    i = lines.index("<details>")
    assert lines[i + 1] == "<summary>Metadata</summary>"
    assert any(l.startswith("- Baseline (`perf_base.json`) Commit: `aaaaaaa`") for l in lines)
    assert any(l.startswith("- New (`perf_new.json`) Commit: `bbbbbbb`") and "quantization: mxfp8" in l for l in lines)
    assert "- Timestamp: NOW" in lines and lines[-1] == "</details>"


def test_reversed_order_flips_statuses():
    lines = _lines(compare_files([NEW, BASE], now="NOW"))
    assert "| **E2E Latency** | 8000.00 ms | 10000.00 ms | **+2000.00 ms (+25.0%)** | ❌ (Slower) |" in lines
    assert "| **Peak Memory (device)** | 10.00 GiB | 20.00 GiB | **+10.00 GiB (+100.0%)** | ❌ (Higher) |" in lines
    assert "| DecodingStage | 1000.00 | 496.00 | -504.00 | -50.4% | 🟢 |" in lines


def test_sglang_perf_json_is_accepted():
    lines = _lines(compare_files([SG_BASE, SG_NEW], now="NOW"))
    assert "| **E2E Latency** | 60000.00 ms | 59000.00 ms | **-1000.00 ms (-1.7%)** | ⚪️ (Similar) |" in lines
    assert "| **Denoising** | 56000.00 ms | 55000.00 ms | **-1000.00 ms (-1.8%)** | ⚪️ (Similar) |" in lines
    assert "| **Peak Memory** | n/a | n/a | - | - |" in lines
    assert "| DenoisingStage | 56000.00 | 55000.00 | -1000.00 | -1.8% | ⚪️ |" in lines
    assert "| Denoising Loop (4 steps) | 56000.00 | 55000.00 | -1000.00 | -1.8% | ⚪️ |" in lines
    assert "| TextEncodingStage | 900.00 | 905.00 | +5.00 | +0.6% | ⚪️ |" in lines
    assert any("Commit: `4c9f31b85`" in l and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in l for l in lines)


def test_legacy_denoising_step_names_are_grouped():
    run = load_perf(SG_LEGACY)
    assert run.loop_ms == 800.0 and run.loop_steps == 3
    assert "Denoising Loop" not in run.stages and run.denoise_ms == 800.0
    lines = _lines(compare_files([SG_LEGACY, SG_LEGACY], now="NOW"))
    assert "| Denoising Loop (3 steps) | 800.00 | 800.00 | +0.00 | +0.0% | ⚪️ |" in lines
    assert not any("denoising_step_" in l for l in lines)


def test_mixed_mxdit_and_sglang_files():
    # an old mxdit file (stage names "denoising" ...) and an SGLang file: the stages meet on one row
    out = compare_files([BASE, SG_NEW], now="NOW")
    assert "| DenoisingStage | 9000.00 | 55000.00 | +46000.00 | +511.1% | 🔴 |" in out
    assert "| denoising |" not in out and "n/a | 55000.00" not in out


def test_three_files_multi_column():
    lines = _lines(compare_files([BASE, NEW, SG_NEW], now="NOW"))
    assert "| Metric | perf_base.json | perf_new.json | sglang_new.json |" in lines
    assert "| **E2E Latency** | 10000.00 ms (baseline) | 8000.00 ms (-20.0%) ✅ | 59000.00 ms (+490.0%) ❌ |" in lines
    assert "| Stage Name | perf_base.json (ms) | perf_new.json (ms) | sglang_new.json (ms) |" in lines
    assert "| DecodingStage | 496.00 | 1000.00 (+101.6%) 🔴 | 3089.50 (+522.9%) 🔴 |" in lines  # one row for all three
    assert any(l.startswith("- Run 2 (`sglang_new.json`)") for l in lines)


@pytest.mark.parametrize(
    "base,new,expected",
    [(1000, 1100, "⚪️"), (1000, 1121, "🔴"), (100, 219, "⚪️"), (100, 221, "🔴"), (1000, 880, "⚪️"),
     (1000, 879, "🟢"), (100, 0, "⚪️"), (2000, 1799, "🟢")],
)
def test_stage_status_rule(base, new, expected):
    # red above max(base*1.1, base+120), green below min(base*0.9, base-120)
    assert stage_status(base, new) == expected


def test_summary_status_rule():
    assert summary_status(100, 97.9).startswith("✅")
    assert summary_status(100, 98).startswith("⚪️")
    assert summary_status(100, 102).startswith("⚪️")
    assert summary_status(100, 102.1).startswith("❌")


def test_cli_prints_report_and_leaves_inputs_alone(capsys):
    before = BASE.read_bytes(), NEW.read_bytes()
    assert main(["compare-perf", str(BASE), str(NEW)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Performance Comparison Report\n")
    assert "| **E2E Latency** | 10000.00 ms | 8000.00 ms | **-2000.00 ms (-20.0%)** | ✅ (Faster) |" in out
    assert (BASE.read_bytes(), NEW.read_bytes()) == before


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"steps": []}))
    for args, needle in [
        ([str(BASE), str(tmp_path / "missing.json")], "missing.json does not exist"),
        ([str(BASE), str(bad)], "bad.json is not valid JSON"),
        ([str(BASE), str(nokey)], "nokey.json is not a perf JSON"),
        ([str(BASE)], "the following arguments are required"),
    ]:
        assert main(["compare-perf", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mxdit compare-perf: error: ") and needle in err, err


def test_transformer_weights_row_from_mxdit_records(tmp_path):
    base = json.loads(BASE.read_text())
    new = json.loads(NEW.read_text())
    base["model_memory_bytes"] = {"transformer": 2 * 1024**3, "transformer_2": 2 * 1024**3, "vae": 1, "text_encoder": 1}
    new["model_memory_bytes"] = {"transformer": 1024**3, "transformer_2": 1024**3, "vae": 1, "text_encoder": 1}
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "n.json").write_text(json.dumps(new))
    lines = _lines(compare_files([tmp_path / "b.json", tmp_path / "n.json"], now="NOW"))
    assert "| **Transformer Weights** | 4.00 GiB | 2.00 GiB | **-2.00 GiB (-50.0%)** | ✅ (Lower) |" in lines
    assert not any("Transformer Weights" in l for l in _lines(compare_files([SG_BASE, SG_NEW], now="NOW")))
