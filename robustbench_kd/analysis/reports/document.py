"""A report as a list of blocks, rendered to Markdown (+ PNG files), to one self-contained HTML file,
and to one overview PNG of every figure.

The HTML embeds the figures as base64 data URIs, so ``report.html`` can be mailed or attached on its own;
``overview.png`` tiles the figures with their titles (a glance at the whole report, e.g. in an issue).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from robustbench_kd.storage.atomic import atomic_write_text

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path


Block = Heading | Paragraph | Table | Figure


def to_markdown(blocks: list[Block], out: Path) -> str:
    """Markdown with figures linked relative to ``out`` (the report directory)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(row) + " |" for row in block.rows] + [""]
        else:
            lines += [f"![{block.title}]({block.path.relative_to(out).as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML page (inline CSS, figures as data URIs)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.title)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_documents(blocks: list[Block], out: Path, title: str) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``overview.png`` under ``out``; returns their paths."""
    figures = [b for b in blocks if isinstance(b, Figure)]
    paths = {
        "markdown": atomic_write_text(out / "report.md", to_markdown(blocks, out)),
        "html": atomic_write_text(out / "report.html", to_html(blocks, title)),
    }
    if figures:
        paths["overview"] = overview_image(out / "overview.png", figures, title)
    return paths


def overview_image(path: Path, figures: list[Figure], title: str) -> Path:
    """Every figure with its title in one image: two per row, a very wide or very tall one across a row."""
    import matplotlib.image as mpimg  # after _new_figure has selected the Agg backend

    from robustbench_kd.analysis.reports.figures import _new_figure, _save

    images = [(figure.title, mpimg.imread(figure.path)) for figure in figures]
    rows: list[list[tuple[str, np.ndarray, bool]]] = []
    for name, image in images:
        aspect = image.shape[1] / image.shape[0]
        alone = aspect > 1.9 or aspect < 0.75
        if alone or not rows or len(rows[-1]) == 2 or rows[-1][0][2]:
            rows.append([(name, image, alone)])
        else:
            rows[-1].append((name, image, alone))
    # Row height: what its widest-scaled member needs at a page width of 16 inches.
    heights = [
        max(image.shape[0] / image.shape[1] * (16.0 if alone else 8.0) for _, image, alone in row) for row in rows
    ]
    fig, _ = _new_figure(16.0, sum(heights) + 0.4 * len(rows) + 0.6)
    fig.clear()
    fig.suptitle(title, fontsize=14, y=1.0 - 0.2 / fig.get_figheight(), va="top")  # inches, not a share of a tall page
    grid = fig.add_gridspec(len(rows), 2, height_ratios=heights)
    for r, row in enumerate(rows):
        for c, (name, image, alone) in enumerate(row):
            ax = fig.add_subplot(grid[r, :] if alone else grid[r, c])
            ax.imshow(image)
            ax.set_title(name, fontsize=10)
            ax.axis("off")
    return _save(fig, path, top=1.0 - 0.5 / fig.get_figheight())  # half an inch for the title
