"""bench/scale.png from the figures the queue-depth benchmarks write: on the left,
throughput against queue depth (bench/scale-throughput.json, `python -m
bench.throughput_depth`); on the right, one dispatch pass against queue depth
(bench/scale-pass.json, `python -m bench.dispatch_depth`). Either file may be missing: its
panel then says which benchmark to run.

    python -m bench.plot_scale [--dir bench] [--out bench/scale.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THROUGHPUT_FILE = "scale-throughput.json"
PASS_FILE = "scale-pass.json"
PLOT_FILE = "scale.png"
# Depths below this sit on a linear stretch of the axis, so that an empty queue (0) has a
# place of its own left of the decades.
LINEAR_BELOW = 1_000


def add_output_options(parser: argparse.ArgumentParser, writes: str, reads: str) -> None:
    """--dir and --plot of a benchmark that writes `writes` and plots it beside `reads`."""
    parser.add_argument("--dir", type=Path, default=HERE,
                        help=f"where to write {writes} (and read {reads}) for the plot")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"the plot; default DIR/{PLOT_FILE}")


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _depth_label(depth: float) -> str:
    if depth == 0:
        return "0\n(empty)"
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if depth >= size:
            return f"{depth / size:g}{suffix}"
    return f"{depth:g}"


def _depth_axis(ax: Any, depths: list[int]) -> None:
    """Symmetric-log depth axis: 0 to 1,000 linear, decades above, ticks labelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("symlog", linthresh=LINEAR_BELOW, linscale=0.7)
    top = max([*depths, LINEAR_BELOW])
    ticks = [0, LINEAR_BELOW]
    while ticks[-1] < top:
        ticks.append(ticks[-1] * 10)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _depth_label(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(-0.35 * LINEAR_BELOW, ticks[-1] * 1.6)
    ax.set_xlabel("PENDING jobs queued behind (symmetric log scale)")
    ax.grid(True, axis="both", color="0.9", linewidth=0.6)


def _plain_log_axis(ax: Any) -> None:
    """A log axis labelled 1, 2, 3, 5, 10, ... in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _missing(ax: Any, what: str, module: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{what}: not measured\n(python -m bench.{module})", ha="center",
            va="center", fontsize=10, color="0.4", transform=ax.transAxes)


def _throughput_panel(ax: Any, data: dict[str, Any]) -> None:
    points = sorted(data["depths"], key=lambda p: p["depth"])
    depths = [p["depth"] for p in points]
    rates = [p["jobs_s"] for p in points]
    plain = data["plain_celery_jobs_s"]
    ax.plot(depths, rates, "o-", color="C0", label="gpuq, end to end to SUCCEEDED")
    for depth, rate in zip(depths, rates, strict=True):
        ax.annotate(f"{rate:.0f}", (depth, rate), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8, color="C0")
    ax.axhline(plain, color="C2", linewidth=1.2,
               label=f"plain Celery, {data['gpus']} processes: {plain:.0f} jobs/s")
    target = data.get("target_ratio_plain", 0.8)
    ax.axhline(target * plain, color="C2", linewidth=1, linestyle="--",
               label=f"target: {target:g}x plain Celery ({target * plain:.0f} jobs/s)")
    tops = [*rates, plain]
    slurm = data.get("slurm_array")
    if slurm:
        ax.axhline(slurm["jobs_s"], color="C4", linewidth=1.2, linestyle="-.",
                   label=f"Slurm array of {slurm['tasks']:,}: {slurm['jobs_s']:.0f} jobs/s")
        tops.append(slurm["jobs_s"])
    else:
        ax.text(0.01, 0.015, f"Slurm array: not measured ({data.get('slurm_note', 'n/a')})",
                transform=ax.transAxes, fontsize=7, color="0.4")
    _depth_axis(ax, depths)
    ax.set_ylim(0, max(tops) * 1.4)  # room for the legend above the lines
    ax.set_ylabel("jobs/s")
    ax.set_title(f"Throughput, {data['jobs']:,} `true` jobs on {data['gpus']} fake GPUs\n"
                 f"({data.get('measured_at', '')}, {data.get('cpus', '?')} cores)", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper right")


def _pass_panel(ax: Any, data: dict[str, Any]) -> None:
    points = sorted(data["depths"], key=lambda p: p["depth"])
    depths = [p["depth"] for p in points]
    for label, key, style, color in (("gpuq", "gpuq", "o-", "C0"),
                                     ("before revision 0003", "before_0003", "s--", "C3")):
        ax.plot(depths, [p[key]["p50_ms"] for p in points], style, color=color,
                label=f"{label}, p50")
        ax.plot(depths, [p[key]["p99_ms"] for p in points], style, color=color, alpha=0.35,
                label=f"{label}, p99")
    ax.axhline(data.get("target_p99_ms", 5), color="grey", linewidth=0.8, linestyle=":",
               label=f"target p99, {data.get('target_p99_ms', 5):g} ms")
    _depth_axis(ax, depths)
    _plain_log_axis(ax)
    values = [p[key][q] for p in points for key in ("gpuq", "before_0003")
              for q in ("p50_ms", "p99_ms")]
    ax.set_ylim(min([*values, 1.0]) / 1.3, max([*values, 10.0]) * 1.6)  # a decade at least
    ax.set_ylabel("dispatch pass (ms)")
    ax.set_title(f"One dispatch pass ({data['gpus']} GPUs, one free, SQLite)\n"
                 f"({data.get('measured_at', '')}, {data.get('cpus', '?')} cores)", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left")


def plot(directory: Path = HERE, out: Path | None = None) -> Path | None:
    """Draw both panels from the JSON files in `directory`; None when there are none."""
    throughput = _read(directory / THROUGHPUT_FILE)
    passes = _read(directory / PASS_FILE)
    if throughput is None and passes is None:
        print(f"no {THROUGHPUT_FILE} or {PASS_FILE} in {directory}: nothing to plot",
              flush=True)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    if throughput is not None:
        _throughput_panel(left, throughput)
    else:
        _missing(left, "throughput against queue depth", "throughput_depth")
    if passes is not None:
        _pass_panel(right, passes)
    else:
        _missing(right, "dispatch pass against queue depth", "dispatch_depth")
    fig.tight_layout()
    path = out or directory / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw bench/scale.png from the JSON files.")
    parser.add_argument("--dir", type=Path, default=HERE,
                        help=f"where {THROUGHPUT_FILE} and {PASS_FILE} are")
    parser.add_argument("--out", type=Path, default=None, help=f"default: DIR/{PLOT_FILE}")
    args = parser.parse_args()
    plot(args.dir, args.out)


if __name__ == "__main__":
    main()
