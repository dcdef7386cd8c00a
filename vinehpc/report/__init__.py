"""`vinehpc report RUN_DIR`: where a run's time went, from its transactions.jsonl alone.

    aggregate.py   one streaming pass over the journal into bounded aggregates
    stats.py       per-category counts, sums and log histograms
    plots.py       the figures (matplotlib, imported only to draw the HTML page)
    render.py      the summary (--json), the terminal text (--text), the self-contained HTML page
"""
from __future__ import annotations

import json
import os

from .aggregate import ReportError, load

__all__ = ["ReportError", "load", "summary", "write_html", "report"]


def summary(run_dir: str) -> dict:
    """The report's numbers for a run directory (or a transactions.jsonl) as plain data."""
    from .render import summary as _summary
    return _summary(load(run_dir))


def write_html(agg, path: str, title: str | None = None) -> None:
    """One self-contained HTML file (inline SVG, inline CSS, no network) from load()'s aggregates."""
    from .plots import Figures
    from .render import default_title, page, summary as _summary
    figures = Figures(agg).draw()
    doc = page(_summary(agg), figures, title or default_title(agg.path))
    tmp = path + ".part"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, path)
    except OSError as e:
        raise ReportError("cannot write %s: %s (give -o FILE.html where you can write)" % (path, e)) from None


def report(run_dir: str, output: str | None = None, text: bool = False, as_json: bool = False, out=None) -> str | None:
    """What `vinehpc report` does: print --text / --json to `out`, write the HTML to `output`
    (RUN_DIR/report.html when neither --text nor --json is asked).  Returns the HTML's path."""
    from .render import summary as _summary, text as _text
    agg = load(run_dir)
    if text or as_json:
        s = _summary(agg)
        if out is not None:
            out.write(json.dumps(s, indent=1, default=str) + "\n" if as_json else _text(s))
    if output is None and (text or as_json):
        return None
    path = output or os.path.join(os.path.dirname(agg.path), "report.html")
    write_html(agg, path)
    return path
