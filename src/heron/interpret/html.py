"""A report as one HTML page plus its PNG files, in one folder, readable offline.

No script, no web font, no remote URL: the page is plain HTML with an inline
style sheet, and every image is a file beside it referenced by a relative
path, so the folder can be zipped, mailed or opened from disk.
`missing_files` is the check that a written page is complete.

    write_html(out / "index.html", "Explanation of runs/demo", [Section("Logit lens", about, images=["lens.png"])])
"""
from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from heron.store.atomic import write_text_atomic

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 68rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
p.about { color: #444; max-width: 52rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; font-family: monospace; white-space: pre; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
nav li { margin: 0.15rem 0; }
"""


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ""


@dataclass(frozen=True)
class Section:
    """One part of the report: what it shows and how to read it, then its figures and tables."""

    title: str
    about: str
    images: Sequence[str] = field(default_factory=tuple)  # paths relative to the page's folder
    tables: Sequence[Table] = field(default_factory=tuple)


def write_html(path: str | os.PathLike[str], title: str, sections: Sequence[Section],
               facts: Sequence[tuple[str, str]] = ()) -> Path:
    """Write the page atomically; returns its path. ValueError names an image that is not on
    disk, or that is outside the page's folder (absolute, or climbing out with ".."): the
    folder would no longer hold everything the page shows."""
    path = Path(path)
    for section in sections:
        for image in section.images:
            if _leaves_folder(image):
                raise ValueError(f"images: {image} (section {section.title!r}) is outside the report folder "
                                 f"{path.parent}; copy it into that folder and give its path relative to it")
            if not (path.parent / image).is_file():
                raise ValueError(f"images: {image} (section {section.title!r}) is not in {path.parent}")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if facts:
        parts.append(_table(Table(["", ""], [list(f) for f in facts]), header=False))
    parts.append("<nav><ol>" + "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>'
                                       for i, s in enumerate(sections)) + "</ol></nav>")
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(section.title)}</h2>')
        parts.extend(f'<p class="about">{html.escape(p)}</p>' for p in section.about.split("\n\n"))
        parts.extend(f'<img src="{html.escape(image)}" alt="{html.escape(section.title)}">'
                     for image in section.images)
        parts.extend(_table(table) for table in section.tables)
    parts.append("</body></html>\n")
    return write_text_atomic(path, "\n".join(parts))


def _table(table: Table, header: bool = True) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    head = "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    return f"<table>{caption}{head}{body}</table>"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def _leaves_folder(ref: str) -> bool:
    """True when `ref` names a path outside the folder it is relative to (absolute, or
    climbing out with ".."), so that zipping the folder would leave the file behind."""
    return PurePath(ref).is_absolute() or PurePath(os.path.normpath(ref)).parts[:1] == ("..",)


def missing_files(page: str | os.PathLike[str]) -> list[str]:
    """Every src or href of the page that is neither an in-page anchor nor a file inside
    its folder (a file reached by an absolute path or "../" counts as missing)."""
    page = Path(page)
    refs = [html.unescape(r) for r in re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))]
    return [r for r in refs if not r.startswith("#") and (_leaves_folder(r) or not (page.parent / r).is_file())]


__all__ = ["Section", "Table", "missing_files", "write_html"]
