"""The report page: one self-contained HTML file (every plot embedded as a base64 ``data:`` URI,
tables inline, no external resource), so ``index.html`` can be mailed or attached alone.

Each plot also names its PNG file (``data-file``) and each section says what was skipped and why.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.3em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.skip { color: #8a5300; background: #fff6e5; padding: 0.3em 0.6em; border-left: 3px solid #e0a030; }
.inputs { font-size: 0.85em; color: #444; }
"""


@dataclass
class Plot:
    """A PNG written to the report folder, with the heading and caption it gets on the page."""

    path: Path
    title: str
    caption: str = ""
    details: str = ""  # extra HTML under the caption (e.g. a table of the values shown)


@dataclass
class Section:
    """One heading of the page: what the paper's figure or table shows, its plots, its tables
    (HTML) and the reasons anything was skipped."""

    title: str
    about: str
    plots: list[Plot] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _plot_html(plot: Plot) -> str:
    name = html.escape(plot.path.name)
    caption = html.escape(plot.caption)
    return (f'<figure>\n<img src="{_data_uri(plot.path)}" alt="{html.escape(plot.title)}" data-file="{name}">\n'
            f"<figcaption><b>{html.escape(plot.title)}</b> ({name}). {caption}</figcaption>\n{plot.details}</figure>")


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>", f"<p>{html.escape(section.about)}</p>"]
    parts += [_plot_html(p) for p in section.plots]
    parts += section.tables
    parts += [f'<p class="skip">Skipped: {html.escape(s)}</p>' for s in section.skipped]
    return "\n".join(parts)


def render_page(title: str, sections: list[Section], inputs: list[str], notes: list[str]) -> str:
    """The whole page: title, list of inputs read, input notes, then every section."""
    found = "".join(f"<li>{html.escape(x)}</li>" for x in inputs) or "<li>nothing</li>"
    note_html = "".join(f'<p class="skip">{html.escape(n)}</p>' for n in notes)
    body = "\n".join(_section_html(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<div class="inputs">Inputs read:<ul>{found}</ul></div>\n{note_html}\n{body}\n</body>\n</html>\n')
