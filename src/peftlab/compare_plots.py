"""The plots of `peftlab.compare`: metric vs rank (a line per setting of everything swept but r), loss curves per
algorithm, metric vs trainable parameters, throughput and peak memory per run (PNG)."""

from __future__ import annotations

from pathlib import Path


def has(row: dict, key: str) -> bool:
    return isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)


def shorten(text: str, limit: int) -> str:
    """At most `limit` characters, cut at a word boundary when one is near, with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit * 0.7 else cut) + "…"


def rank_series(rows: list[dict], metric: str) -> dict[str, list[dict]]:
    """The runs with a rank and the metric, one line per setting of everything swept but the rank (one line per
    alpha ratio in +sweep=rank_alpha, per method × algorithm in a cross-group sweep), else per PEFT method."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("r") is not None and has(r, metric):
            rest = ",".join(o for o in r.get("swept", []) if not o.startswith("peft.r="))
            series.setdefault(rest or str(r.get("peft")), []).append(r)
    return series


def figures(rows: list[dict], metric: str) -> dict:
    """name → matplotlib Figure of the finished runs among `rows`, in their order (compare hands them ranked):
    metric vs rank, loss curves (one panel per algorithm), metric vs trainable parameters, throughput and peak
    memory. Legends sit outside the axes at 8 pt or more; a line with few points gets markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FixedLocator, MaxNLocator, NullFormatter, NullLocator, ScalarFormatter

    font = 8
    done = [r for r in rows if r["status"] == "finished"]
    several_algos = len({r.get("algo") for r in done}) > 1
    figs = {}

    def legend(ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=font, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)

    fig, ax = plt.subplots(figsize=(7, 4))
    for group, members in rank_series(done, metric).items():
        ax.plot(*zip(*sorted((r["r"], r[metric]) for r in members)), marker="o", label=group)
    ax.set(xlabel="rank r", ylabel=metric, title=f"{metric} by rank")
    ax.set_xscale("log", base=2)
    ranks = sorted({r["r"] for r in done if r.get("r") is not None})
    if ranks:  # a tick at each rank swept, written as a number
        ax.xaxis.set_major_locator(FixedLocator(ranks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    legend(ax)
    figs["metric_vs_rank.png"] = fig

    algos = list(dict.fromkeys(r.get("algo") for r in done))
    fig, axes = plt.subplots(1, len(algos), figsize=(5 * len(algos) + 3, 4), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        curves = [r for r in done if r.get("algo") == algo and r["curve"]]
        for r in curves:
            ax.plot(*zip(*r["curve"]), label=r["run"], linewidth=1.2, marker="o" if len(r["curve"]) <= 20 else None,
                    markersize=3)
        title = f"training loss ({algo})" if several_algos else "training loss"
        ax.set(xlabel="step", ylabel="train/loss", title=title)
        steps = sorted({step for r in curves for step, _ in r["curve"]})
        if len(steps) <= 10:  # each logged step as a tick, not fractions of one
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        legend(ax)
    figs["loss_curves.png"] = fig

    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*X"
    for i, r in enumerate(r for r in done if has(r, metric) and r.get("trainable_params")):
        ax.scatter(r["trainable_params"], r[metric], marker=markers[i % len(markers)], s=36, label=r["run"])
    ax.set(xlabel="trainable parameters", ylabel=metric, title=f"{metric} by trainable parameters")
    counts = [r["trainable_params"] for r in done if r.get("trainable_params")]
    if counts and max(counts) > 10 * min(counts):  # a log axis only where the counts span decades
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter())
    legend(ax)
    figs["metric_vs_params.png"] = fig

    labels = [shorten(r["run"], 48) for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.3 * len(done) + 1.5)), sharey=True)
    axes[0].barh(labels, [r.get("tokens_per_s") or 0 for r in done])
    axes[0].set(xlabel="tokens/s", title="throughput")
    axes[1].barh(labels, [(r.get("peak_mem_bytes") or 0) / 2**20 for r in done])
    axes[1].set(xlabel="peak memory (MiB)", title="peak memory")
    axes[0].tick_params(axis="y", labelsize=font)
    axes[0].invert_yaxis()  # best run on top, as in the tables
    figs["throughput_memory.png"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def plots(rows: list[dict], metric: str, out: Path) -> list[Path]:
    """The figures as PNGs in out/; returns their paths."""
    import matplotlib.pyplot as plt

    written = []
    for name, fig in figures(rows, metric).items():
        fig.savefig(Path(out) / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(Path(out) / name)
    return written
