"""The benchmark's verdicts against its targets and its Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALTERNATING = "1 client, Grad-CAM on/off alternating"
FOUR_ON = "4 clients, Grad-CAM on"
FOUR_OFF = "4 clients, Grad-CAM off"
ON, OFF = "?gradcam=true", "?gradcam=false"
HEATMAP = "?gradcam=true&overlay=heatmap"  # the heatmap alone, as the page asks for it


def _find(results: dict[str, Any], *, backend: str, quantization: str | None = None) -> dict[str, Any] | None:
    for config in results["configs"]:
        if config.get("backend") != backend or "failed" in config:
            continue
        if quantization is None or config.get("quantization") == quantization:
            return config
    return None


def p50(config: dict[str, Any], phase: str, variant: str | None = None) -> float | None:
    """A phase's p50 latency in ms (of one variant when given)."""
    data = config.get("phases", {}).get(phase)
    if data is None:
        return None
    if variant is not None:
        data = data["variants"].get(variant)  # a run from before the variant existed has none
        if data is None:
            return None
    value = data["p50_ms"]
    return None if value is None else float(value)


def gradcam_overhead(config: dict[str, Any], variant: str = ON) -> float | None:
    """p50 with Grad-CAM on over p50 off, minus 1, from the paired (alternating) 1-client phase."""
    on, off = p50(config, ALTERNATING, variant), p50(config, ALTERNATING, OFF)
    return None if not on or not off else on / off - 1.0


def e2e_ratio(config: dict[str, Any], variant: str = ON) -> float | None:
    """End-to-end p50 (1 client, Grad-CAM on) over the bare interpreter's median invoke."""
    on = p50(config, ALTERNATING, variant)
    bare = config.get("bare_invoke", {}).get("median_ms")
    return None if not on or not bare else on / float(bare)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _target(
    name: str, measured: float | None, limit: float, *, unit: str, at_most: bool = True
) -> dict[str, Any]:
    if measured is None:
        return {"target": name, "limit": limit, "measured": None, "met": False, "note": "not measured"}
    met = measured <= limit if at_most else measured >= limit
    gap = measured - limit if at_most else limit - measured
    note = "met" if met else f"missed by {gap:.3g} {unit}".rstrip()
    return {
        "target": name,
        "limit": limit,
        "measured": round(measured, 3),
        "unit": unit,
        "met": met,
        "note": note,
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each issue-5 target with the measured figure and whether it is met."""
    fp32 = _find(results, backend="litert", quantization="none")
    int8 = _find(results, backend="litert", quantization="int8-dynamic")
    tf = _find(results, backend="tensorflow")
    out: list[dict[str, Any]] = []
    if fp32 is not None:
        out.append(
            _target(
                "fp32 peak RSS (4 clients x 12 MP, Grad-CAM on) <= 300 MB",
                fp32["peak_rss_mb"],
                300,
                unit="MB",
            )
        )
    if int8 is not None:
        out.append(_target("int8-dynamic peak RSS <= 200 MB", int8["peak_rss_mb"], 200, unit="MB"))
    main_runs = [r for r in results.get("cgroup_runs", []) if r.get("cpus") is None]
    if main_runs:
        run = main_runs[0]
        out.append(_target("512 MiB cgroup: OOM kills = 0", run.get("oom_kills"), 0, unit=""))
        bad = None if "load" not in run else run["server_errors"] + run["client_errors"]
        out.append(_target("512 MiB cgroup: 5xx + connection errors = 0", bad, 0, unit=""))
    elif results.get("cgroup_error"):
        out.append(
            {"target": "512 MiB cgroup run", "measured": None, "met": False, "note": results["cgroup_error"]}
        )
    if fp32 is not None:
        out.append(
            _target(
                "cold start <= 1.5 s (model on local disk)", fp32["cold_start_s"]["median"], 1.5, unit="s"
            )
        )
        out.append(
            _target(
                "cold start <= 0.75 CPU-s, master + worker (model on local disk; new container vs restart: bench.coldstart)",
                fp32.get("cold_start_cpu_s", {}).get("median"),
                0.75,
                unit="CPU-s",
            )
        )
        out.append(_target("end-to-end p50 <= 1.3 x bare invoke", e2e_ratio(fp32), 1.3, unit="x"))
        overhead = gradcam_overhead(fp32)
        out.append(
            _target("Grad-CAM overhead <= 5 %", None if overhead is None else 100 * overhead, 5.0, unit="%")
        )
        light = gradcam_overhead(fp32, HEATMAP)
        out.append(
            _target(
                "Grad-CAM overhead <= 5 % (overlay=heatmap, as the page asks)",
                None if light is None else 100 * light,
                5.0,
                unit="%",
            )
        )
        out.append(
            _target(
                "end-to-end p50 <= 1.4 x bare invoke (overlay=heatmap)",
                e2e_ratio(fp32, HEATMAP),
                1.4,
                unit="x",
            )
        )
        out.append(_target("RSS growth 0.3 MP -> 12 MP <= 15 MB", fp32["growth"]["growth_mb"], 15, unit="MB"))
    if fp32 is not None and tf is not None:
        out.append(
            _target(
                "TensorFlow peak RSS / ours >= 3",
                _ratio(tf["peak_rss_mb"], fp32["peak_rss_mb"]),
                3,
                unit="x",
                at_most=False,
            )
        )
        out.append(
            _target(
                "TensorFlow cold start / ours >= 4",
                _ratio(tf["cold_start_s"]["median"], fp32["cold_start_s"]["median"]),
                4,
                unit="x",
                at_most=False,
            )
        )
    return out


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{float(value):.{digits}f}{suffix}"


def markdown(results: dict[str, Any], *, plot: Path | None = None) -> str:
    """The report: machine, per-configuration table, TensorFlow ratios, cgroup runs, targets."""
    m = results["machine"]
    lines = [
        "# dermal-fn benchmark",
        "",
        f"- date: {results['date']}; command: `{results['command']}` ({results.get('elapsed_s', 0):.0f} s,"
        f" of which model build/export {results.get('prepare_s', 0):.0f} s)",
        f"- machine: {m['cpu']}, {m['cpus']} CPUs ({m['cpus_available']} used by LiteRT), {m['memory_gb']} GB RAM,"
        f" Linux {m['kernel']}, Python {m['python']}; load average at start"
        f" {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
        f"- uploads: {results['photos']['large']['size'][0]}x{results['photos']['large']['size'][1]} JPEG"
        f" ({results['photos']['large']['bytes'] / 1e6:.1f} MB) under load; 0.3 MP"
        f" ({results['photos']['small']['bytes'] / 1e3:.0f} kB) for the cold start; each load phase"
        f" {results['settings']['seconds']:g} s",
        "",
        "| configuration | model MB | cold start s | cold start CPU-s | peak RSS MB | max PSS MB | growth 0.3→12 MP MB | 1 client p50 / p95 ms"
        " (Grad-CAM on) | p50 off | Grad-CAM overhead | 4 clients p50 / p95 ms | 4 clients req/s (on / off) |"
        " bare invoke ms | p50 / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        if "failed" in c:
            lines.append(f"| {c['name']} | failed: {c['failed'][:200]} |" + " |" * 12)
            continue
        alt = c["phases"][ALTERNATING]["variants"]
        four, four_off = c["phases"][FOUR_ON], c["phases"][FOUR_OFF]
        overhead = gradcam_overhead(c)
        lines.append(
            f"| {c['name']} | {_f(c['model_mb'], 1)} | {_f(c['cold_start_s']['median'], 2)}"
            f" | {_f(c.get('cold_start_cpu_s', {}).get('median'), 2)} | {_f(c['peak_rss_mb'])}"
            f" | {_f(c.get('max_sampled_pss_mb'))} | {_f(c['growth']['growth_mb'], 1)} | {_f(alt[ON]['p50_ms'])} / {_f(alt[ON]['p95_ms'])}"
            f" | {_f(alt[OFF]['p50_ms'])} | {_f(None if overhead is None else 100 * overhead, 1, ' %')}"
            f" | {_f(four['p50_ms'])} / {_f(four['p95_ms'])}"
            f" | {_f(four['throughput_rps'], 2)} / {_f(four_off['throughput_rps'], 2)}"
            f" | {_f(c.get('bare_invoke', {}).get('median_ms'))} | {_f(e2e_ratio(c), 2, ' x')} |"
        )
    tf = _find(results, backend="tensorflow")
    ours = _find(results, backend="litert", quantization="none")
    if tf is not None and ours is not None:
        same = [
            c
            for c in results["configs"]
            if c.get("backend") == "litert"
            and c.get("size") == tf["size"]
            and c.get("quantization") == "none"
        ]
        ours = same[0] if same else ours
        lines += [
            "",
            f"TensorFlow backend (`MODEL_URI=<the .keras>`) against {ours['name']}, same run, same load:",
            "",
            "| figure | TensorFlow | LiteRT bundle | TensorFlow / bundle |",
            "|---|---:|---:|---:|",
        ]
        pairs = [
            ("peak RSS MB", tf["peak_rss_mb"], ours["peak_rss_mb"]),
            ("cold start s", tf["cold_start_s"]["median"], ours["cold_start_s"]["median"]),
            ("1 client p50 ms, Grad-CAM on", p50(tf, ALTERNATING, ON), p50(ours, ALTERNATING, ON)),
            ("4 clients p50 ms, Grad-CAM on", p50(tf, FOUR_ON), p50(ours, FOUR_ON)),
            (
                "4 clients req/s, Grad-CAM on",
                tf["phases"][FOUR_ON]["throughput_rps"],
                ours["phases"][FOUR_ON]["throughput_rps"],
            ),
            ("RSS growth 0.3→12 MP MB", tf["growth"]["growth_mb"], ours["growth"]["growth_mb"]),
        ]
        for name, a, b in pairs:
            ratio = _ratio(a, b)
            lines.append(f"| {name} | {_f(a, 2)} | {_f(b, 2)} | {_f(ratio, 2, ' x')} |")
    lines += ["", "Inside a real memory cgroup (4 clients × 12 MP, Grad-CAM on):", ""]
    if results.get("cgroup_error"):
        lines.append(f"**NO CGROUP RUN**: {results['cgroup_error']}")
    if results["cgroup_runs"]:
        lines += [
            "| limit | cgroup | seconds | requests 200 | 5xx | errors | OOM kills | limit hits | Grad-CAM ok / skipped"
            " | peak RSS MB | cgroup peak MB (incl. page cache) | p50 / p95 ms | verdict |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for run in results["cgroup_runs"]:
            if "load" not in run:
                lines.append(f"| {run['label']} | failed: {run.get('failed', '')[:200]} |" + " |" * 11)
                continue
            load = run["load"]
            gc = load["variants"][ON]["gradcam"]
            lines.append(
                f"| {run['label']} | v{run['cgroup_version']} | {run['seconds']:g} | {load['statuses'].get('200', 0)}"
                f" | {run['server_errors']} | {run['client_errors']} | {run['oom_kills']} | {run['limit_hits']}"
                f" | {gc.get('ok', 0)} / {gc.get('skipped', 0)} | {_f(run['peak_rss_mb'])} | {_f(run['cgroup_peak_mb'])}"
                f" | {_f(load['p50_ms'])} / {_f(load['p95_ms'])} | {'PASS' if run['ok'] else 'FAIL'} |"
            )
    lines += ["", "Targets:", "", "| target | measured | verdict |", "|---|---:|---|"]
    for t in results["targets"]:
        measured = "–" if t.get("measured") is None else f"{t['measured']:g} {t.get('unit', '')}".strip()
        lines.append(f"| {t['target']} | {measured} | {t['note']} |")
    if plot is not None:
        lines += ["", f"RSS over time per configuration: `{plot}`"]
    return "\n".join(lines) + "\n"
