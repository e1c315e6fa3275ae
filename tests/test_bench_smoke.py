"""The benchmark's smoke version: tiny model, real server, real load, real cgroup where there is one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench import report
from bench.load import percentile

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--allow-no-cgroup"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.returncode, out


@pytest.mark.tensorflow
@pytest.mark.slow
def test_quick_run_measures_a_real_server(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    (config,) = results["configs"]
    assert config["backend"] == "litert" and "failed" not in config
    assert 0 < config["cold_start_s"]["median"] < 120
    # two processes (gunicorn master and worker), each a Python with NumPy and Pillow loaded
    assert len(config["peak_rss_by_process_mb"]) >= 2
    assert config["peak_rss_mb"] > 40
    assert config["peak_rss_mb"] >= config["max_sampled_rss_mb"] - 1
    assert config["growth"]["statuses"] == [200] * 6
    for name, phase in config["phases"].items():
        assert phase["requests"] > 0, name
        assert set(phase["statuses"]) == {"200"}, (name, phase["statuses"])
        assert phase["server_errors"] == 0 and not phase["errors"]
    alternating = config["phases"][report.ALTERNATING]["variants"]
    assert set(alternating[report.ON]["gradcam"]) == {"ok"}
    assert set(alternating[report.OFF]["gradcam"]) == {"disabled"}
    assert alternating[report.ON]["server_median_ms"]["gradcam"] > 0
    assert config["bare_invoke"]["median_ms"] > 0 and config["bare_invoke"]["runs"] >= 1
    times = [t for t, _ in config["rss_series"]]
    assert times == sorted(times) and len(times) > 10


@pytest.mark.tensorflow
@pytest.mark.slow
def test_quick_run_uses_a_real_cgroup_or_says_why(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    if results["cgroup_error"]:
        assert not results["cgroup_runs"]
        assert "NO CGROUP RUN" in (out / "report.md").read_text()
        pytest.skip(f"no memory cgroup on this machine: {results['cgroup_error']}")
    (run,) = results["cgroup_runs"]
    assert run["server_in_cgroup"] and run["server_alive"]
    assert run["oom_kills"] == 0 and run["server_errors"] == 0 and run["client_errors"] == 0
    assert run["ok"]
    assert run["load"]["statuses"].get("200", 0) > 0
    assert not Path(run["cgroup"]).exists()  # removed afterwards


@pytest.mark.tensorflow
@pytest.mark.slow
def test_quick_run_writes_report_and_plot(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    text = (out / "report.md").read_text()
    assert "| litert 64px fp32 |" in text and "Targets:" in text
    with Image.open(out / "rss.png") as plot:
        assert plot.format == "PNG" and plot.size == (1200, 700)
        # the line is drawn: not just white and grey
        colours = {c for _, c in plot.convert("RGB").getcolors(1 << 20) or []}
        assert (31, 119, 180) in colours


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0


def test_targets_say_met_or_missed_by_how_much() -> None:
    within = report._target("x <= 300 MB", 250.0, 300, unit="MB")
    over = report._target("x <= 300 MB", 320.0, 300, unit="MB")
    ratio = report._target("TF / ours >= 3", 2.5, 3, unit="x", at_most=False)
    assert within["met"] and within["note"] == "met"
    assert not over["met"] and over["note"] == "missed by 20 MB"
    assert not ratio["met"] and ratio["note"] == "missed by 0.5 x"
    assert report._target("unmeasured", None, 1, unit="s")["met"] is False


def test_idle_rss_guard_compares_with_the_committed_figure() -> None:
    """The committed baseline is read as the benchmark reads it; above its tolerance is a regression."""
    from bench.coldstart import BASELINE, idle_rss_guard

    baseline = json.loads(BASELINE.read_text())
    committed = float(baseline["idle_rss_mb"])
    assert 30 < committed < 200
    assert idle_rss_guard(committed, baseline)["verdict"] == "ok"
    assert idle_rss_guard(committed * (1 + baseline["tolerance"]) + 0.1, baseline)["verdict"] == "regressed"
    # functions-framework 3.5 -> 3.6 (#323): ~125 -> 200+ MB would be caught
    assert idle_rss_guard(committed + 100, baseline)["verdict"] == "regressed"


def test_restart_cpu_guard_catches_an_import_like_ml_dtypes_0_7() -> None:
    """A worker restart's cold start in CPU-seconds against the committed figure."""
    from bench.coldstart import BASELINE, restart_cpu_guard

    baseline = json.loads(BASELINE.read_text())
    committed = float(baseline["restart_cpu_s"])
    assert 0.2 < committed < 3.0
    assert restart_cpu_guard(committed, baseline)["verdict"] == "ok"
    limit = committed * (1 + baseline["restart_cpu_tolerance"])
    assert restart_cpu_guard(limit + 0.01, baseline)["verdict"] == "regressed"
    # ml-dtypes 0.7.0's import added 0.7 CPU-s to every start
    assert restart_cpu_guard(committed + 0.7, baseline)["verdict"] == "regressed"
