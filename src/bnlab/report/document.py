"""The report's files: ``claims.json``, ``summary.md``, ``figures/*.png`` and ``report.html``.

Every file is written to a temporary name and renamed into place; ``report.html`` is removed
first and written last, so a report that stops half-way never leaves a complete-looking page.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.report.claim import ClaimResult
from bnlab.report.verdicts import Spread, Verdict


@dataclass
class FigureFile:
    """A drawn figure: its PNG on disk and the words around it."""

    name: str
    title: str
    caption: str
    path: Path


@dataclass
class Table:
    """A plain table for the report's closing sections."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class ReportContent:
    """Everything the report shows, already computed from the run store."""

    title: str
    subtitle: str
    claims: list[ClaimResult]
    figures: dict[str, FigureFile]
    tables: list[Table] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_BADGE = {
    Verdict.REPRODUCED: "#1a7f37",
    Verdict.NOT_REPRODUCED: "#cf222e",
    Verdict.INCONCLUSIVE: "#9a6700",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } .subtitle { color: #59636e; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d1d9e0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.badge { color: white; border-radius: 10px; padding: 1px 9px; white-space: nowrap;
         font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.7em; overflow-x: auto; font-size: 0.82em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d1d9e0; }
figcaption { color: #59636e; font-size: 0.9em; }
section.claim { border-top: 2px solid #d1d9e0; margin-top: 2em; }
.explain { background: #fff8c5; padding: 0.5em 0.8em; border-left: 4px solid #9a6700; }
"""


def _badge(verdict: Verdict) -> str:
    return f'<span class="badge" style="background:{_BADGE[verdict]}">{verdict.value}</span>'


def _cell(value: Any) -> str:
    if isinstance(value, Spread):
        return html.escape(value.describe())
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("n/a" if value is None else str(value))


def _figure_html(figure: FigureFile) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    return (
        f'<figure id="fig-{html.escape(figure.name)}">'
        f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{html.escape(figure.title)}.</b> {html.escape(figure.caption)}"
        "</figcaption></figure>"
    )


def _table_html(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_reference(figure: FigureFile) -> str:
    return (
        f'<p class="subtitle">Figure: <a href="#fig-{html.escape(figure.name)}">'
        f"{html.escape(figure.title)}</a> (shown above).</p>"
    )


def _claim_section(claim: ClaimResult, figures: dict[str, FigureFile], shown: set[str]) -> str:
    parts = [
        f'<section class="claim" id="claim-{claim.id}">',
        f"<h2>Claim {claim.id}: {html.escape(claim.title)} {_badge(claim.verdict)}</h2>",
        f"<p>{html.escape(claim.statement)}</p>",
        f'<p class="subtitle">Judged in: {html.escape("; ".join(claim.settings) or "no setting")}'
        "</p>",
    ]
    if claim.verdict is not Verdict.REPRODUCED and claim.explanation:
        parts.append(f'<p class="explain">{html.escape(claim.explanation)}</p>')
    if claim.numbers:
        parts.append("<h3>Numbers (median [min, max] over seeds)</h3>")
        parts.append(_table_html(["quantity", "value"], list(claim.numbers.items())))
    if claim.parts:
        rows = [[name, verdict.value] for name, verdict in claim.parts.items()]
        parts.append(_table_html(["part of the claim", "verdict"], rows))
    parts.extend(f"<p>{html.escape(note)}</p>" for note in claim.notes)
    for name in claim.figures:
        if name in figures:
            # a figure several claims share is embedded once and linked from the others
            parts.append(
                _figure_reference(figures[name]) if name in shown else _figure_html(figures[name])
            )
            shown.add(name)
    parts.append(f"<h3>Rule</h3><p>{html.escape(claim.rule)}</p>")
    parts.append(
        "<details><summary>The code that decided it</summary>"
        f"<pre>{html.escape(claim.rule_source)}</pre></details>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(content: ReportContent) -> str:
    """The self-contained page: claims table, a section per claim, then the closing tables."""
    summary_rows = "".join(
        f'<tr><td><a href="#claim-{c.id}">{c.id}</a></td><td>{html.escape(c.title)}</td>'
        f"<td>{html.escape('; '.join(c.settings))}</td>"
        f"<td>{_badge(c.verdict)}</td><td>{html.escape(c.headline())}</td></tr>"
        for c in content.claims
    )
    body = [
        f"<h1>{html.escape(content.title)}</h1>",
        f'<p class="subtitle">{html.escape(content.subtitle)}</p>',
        "<h2>Claims</h2>",
        "<table><thead><tr><th>#</th><th>claim</th><th>judged in</th><th>verdict</th>"
        "<th>key numbers</th></tr>"
        f"</thead><tbody>{summary_rows}</tbody></table>",
    ]
    shown: set[str] = set()
    body.extend(_claim_section(c, content.figures, shown) for c in content.claims)
    extra = [f for name, f in content.figures.items() if name not in shown]
    if extra:
        body.append('<section class="claim"><h2>Other figures</h2>')
        body.extend(_figure_html(f) for f in extra)
        body.append("</section>")
    for table in content.tables:
        body.append(f'<section class="claim"><h2>{html.escape(table.title)}</h2>')
        if table.note:
            body.append(f"<p>{html.escape(table.note)}</p>")
        body.append(_table_html(table.columns, table.rows))
        body.append("</section>")
    if content.environment:
        body.append('<section class="claim"><h2>Environment</h2>')
        body.append(f"<pre>{html.escape(json.dumps(content.environment, indent=2))}</pre>")
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(content.title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def render_summary(content: ReportContent) -> str:
    """``summary.md``: the claims table in Markdown, with the key numbers."""
    lines = [
        f"# {content.title}",
        "",
        content.subtitle,
        "",
        "| # | claim | settings | verdict | key numbers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in content.claims:
        cells = [str(c.id), c.title, "; ".join(c.settings), c.verdict.value, c.headline()]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for c in content.claims:
        if c.verdict is not Verdict.REPRODUCED and c.explanation:
            lines += ["", f"- Claim {c.id} ({c.verdict.value}): {c.explanation}"]
    return "\n".join(lines) + "\n"


def write_report(content: ReportContent, out_dir: Path) -> Path:
    """Write claims.json, summary.md and report.html (last) under ``out_dir``; figures must
    already be on disk. Returns the path of report.html."""
    report = out_dir / "report.html"
    report.unlink(missing_ok=True)
    claims = {"title": content.title, "claims": [c.to_dict() for c in content.claims]}
    write_atomic(out_dir / "claims.json", json.dumps(claims, indent=2).encode())
    write_atomic(out_dir / "summary.md", render_summary(content).encode())
    write_atomic(report, render_html(content).encode())
    return report
