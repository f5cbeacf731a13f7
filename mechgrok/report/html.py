"""Render report sections to self-contained HTML and to Markdown.

The HTML has inline CSS and figures as base64 PNG data URIs: it opens offline, from an e-mail
attachment or a different machine, and references no external URL. The Markdown twin references
the same figures as PNG files next to it (``report_files/``).

Section text is *Markdown-lite*: paragraphs separated by blank lines, bullet lists whose lines
start with ``- ``, inline ``**bold**`` and ```code```, and links within the page,
``[text](#anchor)``. Nothing else is interpreted (a link to anything but an anchor stays text), and
all text is escaped with ``html.escape`` before it enters the HTML. The Markdown twin is made just as
inert (``inline_md``): run-folder, config and sub-task names end up in section text, and Markdown
viewers render raw HTML, so ``< > &`` are escaped there too and only in-page links stay links.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
import re
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechgrok.report.sections import Section, Table

__all__ = ["render_html", "render_markdown", "fmt", "inline_html", "inline_md"]

CSS = """
body { margin: 0; background: #f4f5f7; color: #1f2328;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 880px; margin: 0 auto; padding: 2rem 1.5rem 4rem; background: #fff;
  min-height: 100vh; box-shadow: 0 0 0 1px #e6e8eb; }
h1 { font-size: 1.75rem; margin: 0 0 .75rem; }
h2 { font-size: 1.3rem; margin: 2.5rem 0 .75rem; padding-bottom: .3rem; border-bottom: 1px solid #e6e8eb; }
p, ul { margin: .6rem 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em; }
code { background: #f1f3f5; padding: .05em .3em; border-radius: 3px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; margin: 0 0 1.5rem;
  font-size: .95rem; }
dl.meta dt { font-weight: 600; color: #57606a; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
nav.toc { background: #f6f8fa; border: 1px solid #e6e8eb; border-radius: 6px; padding: .25rem 1.25rem .5rem; }
nav.toc h2 { border: 0; margin: .6rem 0 .2rem; font-size: 1rem; }
nav.toc ol { margin: .2rem 0; padding-left: 1.4rem; }
a { color: #0b62c4; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 1rem 0 1.5rem; font-size: .92rem; min-width: 55%; }
caption { text-align: left; font-weight: 600; padding-bottom: .35rem; }
th, td { border-bottom: 1px solid #e6e8eb; padding: .3rem .8rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0 2rem; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: .88rem; color: #57606a; margin-top: .5rem; }
.error { background: #fdecea; border: 1px solid #f5c2c0; border-left: 4px solid #d1242f;
  border-radius: 4px; padding: .75rem 1rem; margin: 1rem 0; }
.error pre { white-space: pre-wrap; margin: .5rem 0 0; }
footer { margin-top: 3rem; font-size: .85rem; color: #6e7781; }
"""


# ------------------------------------------------------------------------------ values and text
def fmt(value: Any) -> str:
    """A table cell or summary value as short text (``None`` -> an em dash, floats to 4 digits)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        return str(int(v)) if v.is_integer() and abs(v) >= 1e4 and abs(v) < 1e15 else f"{v:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (numbers.Real, str)) or v is None for v in value):
        return "(" + ", ".join(fmt(v) for v in value) + ")"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return str(value)


def inline_html(text: str) -> str:
    """Escape ``text`` and turn ```code``` and ``**bold**`` into HTML."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unbalanced backtick: no code spans at all
        parts = [text]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{escape(part)}</code>")
        else:
            html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(part))
            out.append(re.sub(r"\[([^\]]+)\]\((#[\w\-]+)\)", r'<a href="\2">\1</a>', html))
    return "".join(out)


def _blocks(text: str) -> list[list[str]]:
    return [b.strip().splitlines() for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]


def text_html(text: str) -> str:
    html = []
    for lines in _blocks(text):
        if all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{inline_html(line.lstrip()[2:])}</li>" for line in lines)
            html.append(f"<ul>{items}</ul>")
        else:
            html.append(f"<p>{inline_html(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(html)


def _alt(caption: str) -> str:
    """Short alt text: the caption's first sentence, without Markdown-lite marks."""
    return caption.split(". ")[0].replace("`", "").replace("**", "").replace("\n", " ").strip()


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _numeric_columns(table: Table) -> list[bool]:
    """A column is right-aligned when every cell in it is a number (or empty)."""
    return [any(_is_num(r[i]) for r in table.rows if i < len(r))
            and all(_is_num(r[i]) or r[i] is None for r in table.rows if i < len(r))
            for i in range(len(table.header))]


def _groups(sections: Sequence[Section]) -> list[tuple[str, list[Section]]]:
    """Consecutive sections of the same nested run, for a table of contents with one level per run."""
    out: list[tuple[str, list[Section]]] = []
    for s in sections:
        if out and out[-1][0] == s.group:
            out[-1][1].append(s)
        else:
            out.append((s.group, [s]))
    return out


# ------------------------------------------------------------------------------------- HTML
def _table_html(table: Table) -> str:
    numeric = _numeric_columns(table)
    head = "".join(f'<th class="num">{escape(str(h))}</th>' if n else f"<th>{escape(str(h))}</th>"
                   for h, n in zip(table.header, numeric))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{escape(fmt(c))}</td>' if n else f"<td>{escape(fmt(c))}</td>"
                         for c, n in zip(row, numeric)) + "</tr>"
        for row in table.rows)
    cap = f"<caption>{inline_html(table.caption)}</caption>" if table.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, meta: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    """One self-contained HTML page: header, table of contents, then every section in order."""
    meta_html = "".join(f"<dt>{escape(k)}</dt><dd>{inline_html(v)}</dd>" for k, v in meta)
    toc = "".join(
        f"<li>{escape(group)}<ol>" + "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title[len(group) + 2:])}'
                                             "</a></li>" for s in members) + "</ol></li>" if group else
        "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>' for s in members)
        for group, members in _groups(sections))
    body, n_fig = [], 0
    for s in sections:
        parts = [f'<section id="{escape(s.anchor)}">', f"<h2>{escape(s.title)}</h2>"]
        if s.error is not None:
            parts.append('<div class="error" role="alert"><strong>This section failed to build.</strong> '
                         "The rest of the report is unaffected; the traceback is in the log."
                         f"<pre>{escape(s.error)}</pre></div>")
        if s.text:
            parts.append(text_html(s.text))
        parts.extend(_table_html(t) for t in s.tables)
        for fig in s.figures:
            n_fig += 1
            data = base64.b64encode(fig.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{escape(_alt(fig.caption))}">'
                         f"<figcaption><strong>Figure {n_fig}.</strong> {inline_html(fig.caption)}"
                         "</figcaption></figure>")
        parts.append("</section>")
        body.append("\n".join(parts))
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head>",
        "<body><main>",
        f'<header><h1>{escape(title)}</h1><dl class="meta">{meta_html}</dl></header>',
        f'<nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>',
        *body,
        "<footer>Written by <code>mechgrok.report.build</code> from the run folder alone; "
        "the key numbers of every section are in <code>report.json</code>.</footer>",
        "</main></body></html>",
        "",
    ])


# --------------------------------------------------------------------------------- Markdown
_NOT_ANCHOR_LINK = re.compile(r"\]\((?!#[\w\-]+\))")  # "](" that does not open an in-page link


def _md_plain(text: str) -> str:
    """Text outside code spans: no raw HTML, no links but in-page ones, no reference definitions."""
    text = escape(text, quote=False)
    return _NOT_ANCHOR_LINK.sub(r"\\](", text).replace("]:", "\\]:").replace("`", "\\`")


def _md_code(text: str) -> str:
    # a code span shows its content literally, entities included; content with HTML characters goes
    # into <code> with the characters escaped, which Markdown viewers render as the same text
    if not text:
        return ""
    return f"<code>{escape(text, quote=False)}</code>" if any(c in text for c in "<>&") else f"`{text}`"


def inline_md(text: str) -> str:
    """Markdown-lite ``text`` as inert Markdown: ```code``` and ``**bold**`` kept, in-page links
    ``[text](#anchor)`` kept, ``< > &`` escaped, any other link or raw HTML left as plain text.

    >>> print(inline_md("run `<b>` <script>alert(1)</script> [x](javascript:alert(1)) [ok](#training)"))
    run <code>&lt;b&gt;</code> &lt;script&gt;alert(1)&lt;/script&gt; [x\\](javascript:alert(1)) [ok](#training)
    """
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unbalanced backtick: no code spans at all (as in inline_html)
        return _md_plain(text)
    return "".join(_md_code(part) if i % 2 else _md_plain(part) for i, part in enumerate(parts))


def _md_text(text: str) -> str:
    """A section's text: blocks as in ``text_html`` (bullets one per line), each made inert."""
    out = []
    for lines in _blocks(text):
        if all(line.lstrip().startswith("- ") for line in lines):
            out.append("\n".join(f"- {inline_md(line.lstrip()[2:])}" for line in lines))
        else:
            out.append("\n".join(inline_md(line.strip()) for line in lines))
    return "\n\n".join(out)


def _md_cell(value: Any) -> str:
    return inline_md(fmt(value)).replace("|", "\\|").replace("\n", " ")


def _table_md(table: Table) -> str:
    lines = [f"**{inline_md(table.caption)}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_cell(h) for h in table.header) + " |")
    numeric = _numeric_columns(table)
    lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows)
    return "\n".join(lines)


def render_markdown(title: str, meta: Sequence[tuple[str, str]], sections: Sequence[Section],
                    figure_paths: Sequence[Sequence[str]]) -> str:
    """The Markdown twin; ``figure_paths[i][j]`` is the relative path of section i's figure j."""
    def name(text: str) -> str:  # a title or name: one line of plain text (no code spans, no bold)
        return _md_plain(" ".join(text.split())).replace("*", "\\*")

    out = [f"# {name(title)}", ""]
    out += [f"- **{name(k)}:** {inline_md(' '.join(v.split()))}" for k, v in meta] + ["", "## Contents", ""]
    n = 0
    for group, members in _groups(sections):
        if group:
            n += 1
            out.append(f"{n}. {name(group)}")
            out += [f"   - [{name(s.title[len(group) + 2:])}](#{s.anchor})" for s in members]
        else:
            for s in members:
                n += 1
                out.append(f"{n}. [{name(s.title)}](#{s.anchor})")
    out.append("")
    n_fig = 0
    for s, paths in zip(sections, figure_paths):
        out += [f"## {name(s.title)}", ""]
        if s.error is not None:  # as preformatted HTML: the message may carry names, and keeps its lines
            out += ["> **This section failed to build.** The traceback is in the log.", ">"]
            lines = escape(s.error, quote=False).splitlines() or [""]
            lines[0] = "<pre>" + lines[0]
            lines[-1] += "</pre>"
            out += [f"> {line}" for line in lines] + [""]
        if s.text:
            out += [_md_text(s.text), ""]
        for t in s.tables:
            out += [_table_md(t), ""]
        for fig, path in zip(s.figures, paths):
            n_fig += 1
            alt = escape(_alt(fig.caption), quote=False).replace("[", "(").replace("]", ")")
            out += [f"![{alt}]({path})", "", f"*Figure {n_fig}.* {inline_md(fig.caption)}", ""]
    return "\n".join(out)
