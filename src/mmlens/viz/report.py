"""A self-contained HTML report: sections of text, tables and figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #aaa}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
pre{background:#f6f6f6;padding:8px;font-size:12px;max-height:320px;overflow:auto}
figure{display:inline-block;margin:6px}figcaption{font-size:12px;color:#555}"""


def figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Report:
    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, rows: list[dict], max_rows: int = 40) -> None:
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>"
                       for r in rows[:max_rows])
        more = f"<p>… {len(rows) - max_rows} more rows</p>" if len(rows) > max_rows else ""
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>{more}")

    def fragment(self, markup: str) -> None:
        """Markup a result built itself (e.g. a table with thumbnails), inserted as given: trusted HTML only."""
        self.parts.append(markup)

    def figure(self, fig, caption: str = "") -> None:
        self.parts.append(f"<figure><img src='{figure_png(fig)}'/><figcaption>{html.escape(caption)}</figcaption></figure>")

    def html(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>")

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.html())
