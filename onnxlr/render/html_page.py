"""The pieces every onnxlr HTML page shares: the page style, the document around a body, and plots.

Self-contained means no network reference at all: the CSS is inline and uses the reader's system
fonts, and every plot is a matplotlib figure (Agg backend) inlined as an <svg> element whose text
stays text and whose namespace URLs are dropped. `onnxlr.render.html_report` (optimize --html) and
`onnxlr.render.html_analyze` (analyze --html) build their pages from these.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from typing import Any

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f5f7;
       color: #1f2328; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.15em; margin: 0 0 8px; }
h3 { font-size: 1em; margin: 12px 0 4px; }
.muted { color: #656d76; font-size: 0.92em; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.stat { background: #f6f8fa; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.stat b { display: block; font-size: 1.3em; }
pre { background: #1f2328; color: #f6f8fa; padding: 12px; border-radius: 6px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eaeef2; }
figure { margin: 8px 0 0; } figure svg { width: 100%; height: auto; }
"""


def page(title: str, body: Iterable[str], css: str = BASE_CSS) -> str:
    """A complete HTML document around `body` (parts that are already HTML)."""
    return "\n".join([
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title>",
        f"<style>{css}</style></head><body><main>",
        *body,
        "</main></body></html>\n",
    ])


def esc(value: Any) -> str:
    return html.escape(str(value))


def stat(label: str, value: Any) -> str:
    """A headline figure: the value large, its label below."""
    return f"<div class='stat'><b>{esc(value)}</b>{esc(label)}</div>"


def pyplot() -> Any:
    """matplotlib with the file-only Agg backend, imported on first use (only --html needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def svg(figure: Any, salt: str) -> str:
    """The figure as an inline <svg> element with no URLs (namespaces, DOCTYPE and metadata dropped)."""
    import io

    import matplotlib

    plt = pyplot()
    buffer = io.StringIO()
    # Text stays text (page fonts, smaller); a fixed salt gives stable, per-figure unique ids.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"onnxlr-{salt}"}):
        figure.tight_layout()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # HTML5 knows the svg and xlink namespaces without declarations, which carry URLs.
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)


__all__ = ["BASE_CSS", "esc", "page", "pyplot", "stat", "svg"]
