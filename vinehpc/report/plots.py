"""The report's figures: matplotlib (Agg) rendered to inline SVG strings.

matplotlib is imported here only, when a report is drawn, so vinehpc imports without it
(`pip install vinehpc[report]`).  Every figure reads the bounded aggregates of aggregate.py.
"""
from __future__ import annotations

import io
import itertools

from . import aggregate as A
from . import stats

FAILED_COLOR = "#d62728"


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise A.ReportError("the HTML report draws with matplotlib: pip install 'vinehpc[report]' "
                            "(or matplotlib); --text and --json need nothing") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # text.parse_math: a category named "a$b" is a name, not TeX; svg.fonttype none: text stays text
    plt.rcParams.update({"svg.fonttype": "none", "text.parse_math": False, "font.size": 9, "axes.grid": True,
                         "grid.alpha": 0.3, "figure.dpi": 96})
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    fig.clf()
    _plt().close(fig)
    s = buf.getvalue()
    return s[s.index("<svg"):]           # inline: no XML prolog or doctype


class Figures:
    """`draw()` -> {section id: svg}; colors are fixed per category for every figure."""

    def __init__(self, agg):
        self.agg = agg
        self.plt = _plt()
        cats = sorted(agg.categories.values(), key=lambda c: -(c.done + c.failed + c.attempts))
        palette = self.plt.get_cmap("tab10" if len(cats) <= 10 else "tab20").colors
        self.colors = {c.name: palette[i % len(palette)] for i, c in enumerate(cats)}
        span = agg.width * A.NBINS
        self.unit, self.scale = (("hours", 3600.0) if span > 7200 else ("minutes", 60.0) if span > 300
                                 else ("seconds", 1.0))
        self.x = [(i + 0.5) * agg.width / self.scale for i in range(A.NBINS)]

    def _t(self, t) -> float:
        return (t - self.agg.t0) / self.scale

    def _time_axis(self, ax):
        """Every time plot spans the whole run, so they line up one above the other."""
        ax.set_xlabel("time since the run started (%s)" % self.unit)
        ax.set_xlim(0, A.NBINS * self.agg.width / self.scale)

    def draw(self) -> dict:
        return {"over-time": self.over_time(), "timeline": self.timeline(), "histograms": self.histograms(),
                "resources": self.resources(), "transfers": self.transfers(), "workers": self.workers()}

    # ------------------------------------------------------------------ figures
    def over_time(self) -> str:
        a, plt = self.agg, self.plt
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
        waiting = list(itertools.accumulate(s - b + r for s, b, r in zip(a.submitted, a.started, a.requeued)))
        ax1.plot(self.x, waiting, label="waiting (at the bin's end)", color="#ff7f0e")
        ax1.plot(self.x, [v / a.width for v in a.busy_tasks], label="running (mean over the bin)", color="#1f77b4")
        ax1.set_ylabel("tasks")
        ax1.legend(loc="upper right")
        ax2.plot(self.x, list(itertools.accumulate(a.done)), label="done", color="#2ca02c")
        ax2.plot(self.x, list(itertools.accumulate(a.failed)), label="failed", color=FAILED_COLOR)
        ax2.set_ylabel("tasks (cumulative)")
        ax2.legend(loc="upper left")
        ax3.fill_between(self.x, [v / a.width for v in a.capacity], step="mid", alpha=0.25, color="#7f7f7f",
                         label="cores of connected workers")
        ax3.plot(self.x, [v / a.width for v in a.busy_cores], label="cores allocated to running tasks",
                 color="#9467bd", drawstyle="steps-mid")
        ax3.set_ylabel("cores")
        ax3.legend(loc="upper right")
        self._time_axis(ax3)
        return _svg(fig)

    def _rows(self):
        a = self.agg
        rows = [w for w in a.workers.values() if w.busy is not None]
        multi = a.n["sessions"] > 1
        label = (lambda w: "run %d w%s" % (w.key[0], w.key[1])) if multi else (lambda w: "w%s" % w.key[1])
        return rows, {w.key: i for i, w in enumerate(rows)}, [label(w) for w in rows]

    def timeline(self) -> str:
        """A Gantt of attempts per worker; a run with more than GANTT_MAX attempts is drawn binned."""
        a, plt = self.agg, self.plt
        rows, index, labels = self._rows()
        detailed = a.gantt_total <= A.GANTT_MAX
        fig, ax = plt.subplots(figsize=(10, min(2.0 + 0.2 * len(rows), 30) if detailed else
                                        min(2.0 + 0.05 * len(rows), 12)))
        if detailed:
            bars, marks = {}, {"failed": [], "again": []}
            for wkey, s, e, cat, outcome in a.gantt:
                i = index.get(wkey)
                if i is None:
                    continue
                bars.setdefault((cat, outcome in ("done", "running")), []).append((i, self._t(s), max(self._t(e) - self._t(s),
                                                                                          1e-9)))
                if outcome not in ("done", "running"):
                    marks["failed" if outcome == "failed" else "again"].append((self._t(e), i))
            for (cat, ok), items in bars.items():      # one call per color and outcome
                ys, lefts, widths = zip(*items)
                ax.barh(ys, widths, left=lefts, height=0.8, color=self.colors.get(cat, "#999999"),
                        edgecolor=FAILED_COLOR if not ok else "none", linewidth=0 if ok else 1.0,
                        hatch=None if ok else "///")
            for kind, marker in (("failed", "x"), ("again", "v")):
                if marks[kind]:
                    xs, ys = zip(*marks[kind])
                    ax.scatter(xs, ys, marker=marker, color=FAILED_COLOR, zorder=3, s=25,
                               label="failed (final)" if kind == "failed" else "retried / requeued")
            title = "every attempt (%d)" % a.gantt_total
        else:
            self._binned(ax, rows)
            title = ("%d attempts: each cell is one worker over one time bin, colored by the category that used "
                     "it most, darker = busier" % a.gantt_total)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in self.colors.values()]
        ax.legend(handles + ax.get_legend_handles_labels()[0], list(self.colors) + ax.get_legend_handles_labels()[1],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7 if len(rows) < 60 else 4)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(title, fontsize=9)
        self._time_axis(ax)
        return _svg(fig)

    def _binned(self, ax, rows):
        import numpy as np
        from matplotlib.colors import to_rgb
        a = self.agg
        img = np.ones((max(len(rows), 1), A.NBINS, 4))
        img[:, :, 3] = 0.0
        for i, w in enumerate(rows):
            if not w.busy:
                continue
            names = list(w.busy)
            busy = np.array([w.busy[n] for n in names])           # categories x bins, core-seconds
            top = busy.argmax(axis=0)
            frac = np.clip(busy.sum(axis=0) / (w.cores * a.width), 0, 1)
            for b in np.nonzero(frac)[0]:
                img[i, b, :3] = to_rgb(self.colors.get(names[top[b]], "#999999"))
                img[i, b, 3] = 0.25 + 0.75 * frac[b]
        ax.imshow(img, aspect="auto", interpolation="nearest",
                  extent=(0, A.NBINS * a.width / self.scale, len(rows) - 0.5, -0.5))
        ax.grid(False)

    def _hist(self, ax, which, lo, decades, xlabel):
        edges = stats.bin_edges(lo, decades)
        for name, c in self.agg.categories.items():
            h = getattr(c, which)
            if sum(h):
                ax.stairs(h, edges, label=name, color=self.colors.get(name), linewidth=1.5)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tasks")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no measurement in the log", transform=ax.transAxes, ha="center")

    def histograms(self) -> str:
        fig, (ax1, ax2) = self.plt.subplots(1, 2, figsize=(10, 3.5))
        self._hist(ax1, "wall_hist", stats.WALL_LO, stats.WALL_DECADES, "task duration (s, log scale)")
        self._hist(ax2, "mem_hist", stats.MEM_LO, stats.MEM_DECADES, "peak memory measured (MB, log scale)")
        return _svg(fig)

    def resources(self) -> str:
        cats = [c.summary() for c in self.agg.categories.values()]
        fig, (ax1, ax2) = self.plt.subplots(1, 2, figsize=(10, 1.5 + 0.45 * max(len(cats), 1)))
        ys = range(len(cats))
        names = [c["name"] for c in cats]
        ax1.barh([y - 0.2 for y in ys], [c["core_hours_allocated"] for c in cats], height=0.4, color="#c7c7c7",
                 label="allocated (cores x duration)")
        ax1.barh([y + 0.2 for y in ys], [c["core_hours_used"] for c in cats], height=0.4,
                 color=[self.colors.get(n) for n in names], label="used (measured CPU)")
        ax1.set_xlabel("core-hours")
        ax2.barh([y - 0.2 for y in ys], [c["memory_allocated_mean"] or 0 for c in cats], height=0.4,
                 color="#c7c7c7", label="allocated (mean; 0: none asked)")
        ax2.barh([y + 0.2 for y in ys], [c["memory_used_mean"] or 0 for c in cats], height=0.4,
                 color=[self.colors.get(n) for n in names], label="measured peak (mean)")
        ax2.scatter([c["memory_used_max"] or 0 for c in cats], list(ys), marker="|", s=200, color="black",
                    label="measured peak (max)", zorder=3)
        ax2.set_xlabel("memory (MB)")
        for ax in (ax1, ax2):
            ax.set_yticks(list(ys))
            ax.set_yticklabels(names)
            ax.invert_yaxis()
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
        return _svg(fig)

    def transfers(self) -> str:
        a = self.agg
        fig, (ax1, ax2) = self.plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
        mb = [v / 1e6 for v in a.bytes_put]
        ax1.bar(self.x, mb, width=a.width / self.scale, color="#17becf", label="sent to workers in the bin")
        ax1.set_ylabel("MB")
        twin = ax1.twinx()
        twin.plot(self.x, list(itertools.accumulate(mb)), color="#1f77b4", label="cumulative")
        twin.set_ylabel("MB (cumulative)")
        twin.grid(False)
        ax1.legend(loc="upper left")
        twin.legend(loc="upper right")
        ax2.plot(self.x, a.puts, label="inputs sent", color="#17becf", drawstyle="steps-mid")
        ax2.plot(self.x, a.hits, label="cache hits (input already on the worker)", color="#2ca02c",
                 drawstyle="steps-mid")
        ax2.plot(self.x, a.fetches, label="fetches (temps to the manager, URLs)", color="#8c564b",
                 drawstyle="steps-mid")
        ax2.set_ylabel("per bin")
        ax2.legend(loc="upper right", fontsize=8)
        if not (a.n["puts"] or a.n["cache hits"] or a.n["temp fetches"] or a.n["url fetches"]):
            ax1.text(0.5, 0.5, "no input was sent to a worker in this run", transform=ax1.transAxes, ha="center")
        self._time_axis(ax2)
        return _svg(fig)

    def workers(self) -> str:
        a = self.agg
        fig, ax = self.plt.subplots(figsize=(10, 3))
        ax.plot(self.x, [v / a.width for v in a.connected], color="#1f77b4", label="workers connected (mean)",
                drawstyle="steps-mid")
        if a.joins:
            ax.plot([self._t(t) for t in a.joins], [0] * len(a.joins), "^", color="#2ca02c", label="joined",
                    clip_on=False)
        if a.losses:
            ax.plot([self._t(t) for t in a.losses], [0] * len(a.losses), "v", color=FAILED_COLOR,
                    markersize=9, label="lost", clip_on=False)
        ax.set_ylabel("workers")
        ax.legend(loc="upper right")
        self._time_axis(ax)
        return _svg(fig)
