"""throughput.png: accepted msg/s against concurrent sessions, per target, from results.

Owns: the plot only. Contract: `plot_throughput(results, path)`; also
`python bench/plot.py results.json throughput.png`. Median line with min-max bars for
scenario (a) (plain, trusted network) and (b) (STARTTLS + AUTH).
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def plot_throughput(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"a": ("-", "o", "plain 1 KiB (trusted)"), "b": ("--", "s", "STARTTLS+AUTH 1 KiB")}
    for target in res["targets"]:
        for sc, (ls, marker, what) in styles.items():
            xs, med, lo, hi = [], [], [], []
            for s in sorted({r["sessions"] for r in res["runs"] if r["scenario"] == sc}):
                v = [r["accepted_per_s"] for r in res["runs"] if r["scenario"] == sc
                     and r["sessions"] == s and r["target"] == target
                     and not r.get("reuse") and r.get("accepted_per_s") is not None]
                if v:
                    xs.append(s)
                    med.append(statistics.median(v))
                    lo.append(med[-1] - min(v))
                    hi.append(max(v) - med[-1])
            if xs:
                ax.errorbar(xs, med, yerr=[lo, hi], linestyle=ls, marker=marker,
                            capsize=3, label=f"{target}: {what}")
    ax.set_xscale("log")
    ax.set_xticks([1, 10, 50])
    ax.set_xticklabels(["1", "10", "50"])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("messages accepted per second")
    m = res["machine"]
    ax.set_title(f"authrelay bench ({res['mode']}), {m['nproc']} CPUs, {m['date']}",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot_throughput(json.load(f), sys.argv[2])
