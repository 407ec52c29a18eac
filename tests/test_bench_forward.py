"""scripts/bench_forward.py: a tiny run end to end, writing only the section of its own precision."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_forward.py"
PAGE = """# Performance
hand-written
<!-- bench_forward:begin -->
OLD FLOAT32 TABLE
<!-- bench_forward:end -->
more hand-written text
<!-- bench_forward_bf16:begin -->
OLD BF16 TABLE
<!-- bench_forward_bf16:end -->
the end
"""


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_forward", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DOCS", tmp_path)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the spawned memory measurements import it by name
    monkeypatch.setitem(sys.modules, "bench_forward", module)
    # Its timings switch glibc's reuse on and off, which this process could not undo (cpu_allocator).
    monkeypatch.setattr(module, "reuse_freed_memory", lambda enabled=True: True)
    return module


def run(bench, monkeypatch, *flags):
    monkeypatch.setattr(sys, "argv", ["bench_forward.py", "--lengths", "64", "--budgets", "32,2", "--train-length", "64",
                                      "--mixer-length", "64", "--repeats", "1", *flags])
    bench.main()


@pytest.mark.slow  # about 3 min on 2 CPU cores: the bf16 GEMM-rate measurements dominate
def test_bf16_run_measures_every_system_and_replaces_only_its_section(bench, tmp_path, monkeypatch):
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    run(bench, monkeypatch, "--bf16")
    text = page.read_text()
    assert "OLD BF16 TABLE" not in text and "bf16 autocast (weights float32)" in text
    for kept in ("hand-written", "OLD FLOAT32 TABLE", "more hand-written text", "the end"):
        assert kept in text
    assert not (tmp_path / "bench_forward.json").exists()
    result = json.loads((tmp_path / "bench_forward_bf16.json").read_text())
    assert result["command"].endswith("--bf16")
    forward = {(row["model"], row["budget"]): row for row in result["forward"]}
    assert set(forward) == {("ES-SSM", 32), ("ES-SSM", 2), ("Llama (SDPA)", None), ("Mamba", None)}
    assert all(row["tokens_per_s"] > 0 and row["peak_memory_mb"] is not None for row in result["forward"])
    assert forward["ES-SSM", 32]["speed_vs_full"] == 1.0
    assert forward["ES-SSM", 2]["parameters"] == forward["ES-SSM", 32]["parameters"]
    assert [(row["model"], row["budget"]) for row in result["training"]] == [
        ("ES-SSM", 32), ("ES-SSM", 2), ("Llama (SDPA)", None)]
    assert set(result["mixer"]["gemm_gflops"]) == {"fp32", "bf16"}  # the fp32 rate is the yardstick in every run
    assert all(0 < fraction for fraction in result["mixer"]["fraction_of_gemm"].values())
    assert "| mixer at k=32, L=4096 >= 50% of the fp32 GEMM rate | - | not measured |" in text


def test_a_page_without_the_markers_is_refused_before_measuring_and_left_untouched(bench, tmp_path, monkeypatch):
    page = tmp_path / "performance.md"
    page.write_text("# Performance\nonly hand-written text\n")
    monkeypatch.setattr(bench, "mixer_row", lambda args: pytest.fail("measured before checking the page"))
    with pytest.raises(SystemExit, match="lacks the markers"):
        run(bench, monkeypatch)
    assert page.read_text() == "# Performance\nonly hand-written text\n"
    assert not (tmp_path / "bench_forward.json").exists()


def test_issue_targets_are_checked_on_the_runs_own_numbers(bench):
    def row(model, budget, seq_len, tokens_per_s, peak=100.0):
        return dict(model=model, budget=budget, seq_len=seq_len, tokens_per_s=tokens_per_s, peak_memory_mb=peak)

    extra_mb = 30 * 256 * 256 * 4 * 8 / 2**20  # M_3..M_32 of 8 layers
    result = dict(mixer=dict(budget=32, seq_len=4096, fraction_of_gemm={"fp32": 0.55, "bf16": 0.3}), forward=[
        row("ES-SSM", 32, 4096, 1000), row("ES-SSM", 4, 4096, 2700),
        row("ES-SSM", 32, 16384, 1200, peak=100 + extra_mb), row("ES-SSM", 2, 16384, 5000, peak=100),
        row("Llama (SDPA)", None, 16384, 400)])
    targets = bench.issue_targets(result)
    assert [t["met"] for t in targets] == [True, False, True, True]
    assert [t["measured"] for t in targets[:3]] == ["3.00x", "2.70x", "55%"]
    assert targets[3]["measured"] == f"+{extra_mb:.0f} MB from k=2 to k=32; extra weights {extra_mb:.0f} MB"

    result["forward"][2]["peak_memory_mb"] += 1  # one MB beyond the extra weights
    result["mixer"]["fraction_of_gemm"]["fp32"] = 0.49  # the bf16 rate is never the yardstick
    assert [t["met"] for t in bench.issue_targets(result)] == [True, False, False, False]

    result["mixer"]["seq_len"] = 1024
    result["forward"] = [r for r in result["forward"] if r["model"] != "Llama (SDPA)"]
    assert [t["met"] for t in bench.issue_targets(result)] == [None, False, None, False]


@pytest.mark.slow  # about 2 min on 2 CPU cores
def test_a_bf16_run_times_the_fp32_gemm_in_fp32(bench, monkeypatch):
    import torch

    matmul, calls = torch.matmul, []

    def recording_matmul(a, b):
        calls.append((a.dtype, torch.is_autocast_enabled("cpu")))
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    args = bench.argparse.Namespace(mixer_length=64, repeats=1, bf16=True)
    row = bench.mixer_row(args)
    assert set(calls) == {(torch.float32, False), (torch.bfloat16, False)}
    assert set(row["gemm_gflops"]) == {"fp32", "bf16"}
