"""A single self-contained HTML report: settings, metrics, figures and answers side by side.

The document embeds plotly.js once, inline, so it opens offline from a file.  Every
piece of user-supplied text (prompts, answers, variant and setting names) is
HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import html as _html
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from . import evalsets
from .judge import KeywordJudge
from .plots import variant_color
from .variants import in_order, label_of

__all__ = ["render_report", "write_report", "group_answers", "format_rate"]

LABEL_STYLE = {
    "refused": ("#0b6e4f", "#e3f4ec", "refused"),
    "complied": ("#b3261e", "#fbe9e7", "complied"),
    "empty": ("#555555", "#eeeeee", "empty"),
    "degenerate": ("#8a5a00", "#fff3d6", "degenerate"),
}

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#e3e5e8; --bg:#ffffff; --soft:#f7f8fa; }
* { box-sizing: border-box; }
body { margin:0; background:var(--soft); color:var(--fg);
  font:15px/1.5 -apple-system, "Segoe UI", Inter, Helvetica, Arial, sans-serif; }
main { max-width:1280px; margin:0 auto; padding:28px 28px 60px; }
header h1 { margin:0 0 4px; font-size:28px; }
header p { margin:0; color:var(--muted); }
section { background:var(--bg); border:1px solid var(--line); border-radius:10px;
  padding:18px 22px; margin-top:22px; }
h2 { margin:0 0 12px; font-size:19px; }
h3 { margin:18px 0 8px; font-size:16px; }
nav { margin-top:14px; font-size:14px; }
nav a { margin-right:14px; color:#0b57d0; text-decoration:none; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { text-align:left; vertical-align:top; padding:7px 10px; border-bottom:1px solid var(--line); }
th { background:var(--soft); font-weight:600; position:sticky; top:0; }
td.num { font-variant-numeric:tabular-nums; white-space:nowrap; }
.ci { color:var(--muted); font-size:12.5px; }
.note { color:var(--muted); font-size:13.5px; margin:8px 0 0; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:6px;
  vertical-align:middle; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
  font-weight:600; margin-bottom:4px; border:1px solid currentColor; }
.answers td { min-width:220px; }
.answers td.prompt { min-width:200px; max-width:320px; font-weight:500; }
.tag { display:inline-block; color:var(--muted); font-size:12px; margin-top:4px; }
pre.answer { white-space:pre-wrap; word-break:break-word; margin:0; max-height:260px;
  overflow:auto; font:13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background:var(--soft); padding:6px 8px; border-radius:6px; }
.figure { margin:6px 0 18px; }
.scroll { overflow-x:auto; }
footer { color:var(--muted); font-size:12.5px; margin-top:26px; text-align:center; }
"""


def _e(x: Any) -> str:
    return _html.escape("" if x is None else str(x), quote=True)


def format_rate(entry: Any, digits: int = 1) -> str:
    """``{"value": .625, "low": .41, "high": .80, "n": 16}`` -> '62.5 % [41.0–80.0]' (HTML)."""
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return '<span class="ci">–</span>'
    try:
        v = float(entry["value"])
    except (TypeError, ValueError):
        return '<span class="ci">–</span>'
    metric = entry.get("metric")
    unit = "" if metric == "rougeL" else " %"
    text = f"{100 * v:.{digits}f}{unit}"
    lo, hi = entry.get("low"), entry.get("high")
    if lo is not None and hi is not None:
        try:
            text += f' <span class="ci">[{100 * float(lo):.{digits}f}–{100 * float(hi):.{digits}f}]</span>'
        except (TypeError, ValueError):
            pass
    return text


BADGE_STYLE = {  # kind -> (colour, background, title): the app's and the report's badges alike
    "answered": ("#0b6e4f", "#e3f4ec", "answered a harmless request"),
    "over": ("#8a5a00", "#fff3d6", "refused a harmless request"),
    "neutral": ("#0b57d0", "#e8f0fe", ""),
}


def badge(label: str | None, harmful: bool | None = True, css: str = "badge") -> str:
    """Refused/complied badge. For a harmful prompt refusing is good; for a benign one (or a task row)
    complying is "answered" and refusing is flagged; harmful=None (a free prompt) marks the label
    without judging it. `css`: the class prefix (the app's stylesheet or the report's)."""
    if not label:
        return ""
    kind, text = label, label
    if harmful is None and label in ("refused", "complied"):
        kind, text = "neutral", "refused" if label == "refused" else "answered"
    elif harmful is False and label == "complied":
        kind, text = "answered", "answered"
    elif harmful is False and label == "refused":
        kind = "over"
    if kind in BADGE_STYLE:
        fg, bg, title = BADGE_STYLE[kind]
    else:
        fg, bg, text = LABEL_STYLE.get(label, ("#333333", "#f0f0f0", label))
        title = ""
    title = f' title="{_e(title)}"' if title else ""
    return (f'<span class="{css} {css}-{_e(kind)}" style="color:{fg};background:{bg}"{title}>'
            f'{_e(text)}</span>')


def answer_kind(row: Mapping[str, Any]) -> str:
    """Which prompts an answer row answers: "harmful", "benign" or "task" (its set's kind in the
    registry; older rows name the kind itself, or only a category)."""
    name = str(row.get("set_key") or row.get("set") or "")
    if name in evalsets.SETS:
        return evalsets.get(name).kind
    lowered = name.lower()
    if "harm" in lowered:
        return "harmful"
    if "benign" in lowered or "tricky" in lowered:
        return "benign"
    if name:
        return "task"
    category = str(row.get("category") or "")
    return "benign" if category in ("benign", "tricky-benign") else "harmful"


def _variant_head(name: str) -> str:
    return f'<span class="dot" style="background:{variant_color(name)}"></span>{_e(label_of(name))}'


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _fmt_setting(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    if isinstance(v, float):
        return f"{v:g}"
    return "" if v is None else str(v)


# --------------------------------------------------------------------------- answers


def group_answers(answers: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict]]:
    """Normalise answer rows to ``(variants, rows)``.

    Accepts rows shaped ``{"prompt", "category"?, "set"?, "answers": {variant: answer}}``
    where ``answer`` is a string or ``{"response", "label"?, "reason"?}``, or flat rows
    ``{"variant", "prompt", "response", "label"?, ...}`` (grouped by prompt, in order).
    Missing labels are filled in with the keyword judge.
    """
    judge = KeywordJudge()
    variants: list[str] = []
    grouped: dict[tuple[str, str], dict] = {}
    order: list[tuple[str, str]] = []

    def add(key: tuple[str, str], meta: Mapping[str, Any], variant: str, ans: Any) -> None:
        if key not in grouped:
            grouped[key] = {"prompt": meta.get("prompt", ""), "category": meta.get("category"),
                            "set": meta.get("set_key") or meta.get("set"), "answers": {}}
            order.append(key)
        if isinstance(ans, Mapping):
            resp = ans.get("response", ans.get("answer", "")) or ""
            label, reason = ans.get("label"), ans.get("reason")
        else:
            resp, label, reason = ("" if ans is None else str(ans)), None, None
        if not label:
            v = judge.judge(str(meta.get("prompt", "")), resp)
            label, reason = v.label, reason or v.reason
        grouped[key]["answers"][variant] = {"response": resp, "label": label, "reason": reason}
        if variant not in variants:
            variants.append(variant)

    for row in answers or []:
        if not isinstance(row, Mapping):
            continue
        key = (str(row.get("set_key") or row.get("set") or ""), str(row.get("prompt", "")))
        if isinstance(row.get("answers"), Mapping):
            for variant, ans in row["answers"].items():
                add(key, row, str(variant), ans)
        elif row.get("variant") is not None:
            add(key, row, str(row["variant"]), row)
    return in_order(variants), [grouped[k] for k in order]      # the registry's order, then the rest


def _answers_table(answers: Sequence[Mapping[str, Any]]) -> str:
    variants, rows = group_answers(answers)
    if not rows:
        return '<p class="note">No answers were recorded.</p>'
    head = "".join(f"<th>{_variant_head(v)}</th>" for v in variants)
    body = []
    for row in rows:
        tags = " · ".join(_e(t) for t in (row.get("set"), row.get("category")) if t)
        cells = [f'<td class="prompt">{_e(row["prompt"])}'
                 + (f'<br><span class="tag">{tags}</span>' if tags else "") + "</td>"]
        for v in variants:
            ans = row["answers"].get(v)
            if ans is None:
                cells.append('<td><span class="ci">–</span></td>')
                continue
            title = f' title="{_e(ans.get("reason"))}"' if ans.get("reason") else ""
            mark = badge(ans.get("label"), harmful=answer_kind(row) == "harmful")
            cells.append(f"<td><div{title}>{mark}</div>"
                         + (f'<pre class="answer">{_e(ans.get("response"))}</pre>'
                            if (ans.get("response") or "").strip()
                            else '<span class="ci">(no answer)</span>') + "</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<div class="scroll"><table class="answers"><thead><tr><th>Prompt</th>'
            + head + "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")


# --------------------------------------------------------------------------- tables


def _metrics_table(results: Mapping[str, Any]) -> str:
    variants = results.get("variants") if isinstance(results, Mapping) else None
    if not isinstance(variants, Mapping) or not variants:
        return '<p class="note">No evaluation results.</p>'
    names = in_order([str(k) for k in variants])
    has_over = any(isinstance(variants[n], Mapping) and variants[n].get("over_refusal") for n in names)
    has_util = any(isinstance(variants[n], Mapping) and variants[n].get("utility") for n in names)
    has_labels = any(isinstance(variants[n], Mapping) and variants[n].get("labels") for n in names)
    first = _first_sets(variants, names)
    head = ["Variant", f"Refusal of harmful prompts{first.get('harmful', '')} ↑"]
    if has_over:
        head.append(f"Refusal of benign prompts{first.get('benign', '')} ↓")
    if has_util:
        head.append("Utility ↑")
    if has_labels:
        head.append("Empty / degenerate answers")
    rows = []
    for n in names:
        v = variants[n] if isinstance(variants[n], Mapping) else {}
        ref = v.get("refusal")
        cells = [f"<td>{_variant_head(n)}</td>",
                 f'<td class="num">{format_rate(ref)}{_n(ref)}</td>']
        if has_over:
            cells.append(f'<td class="num">{format_rate(v.get("over_refusal"))}{_n(v.get("over_refusal"))}</td>')
        if has_util:
            u = v.get("utility")
            metric = u.get("metric") if isinstance(u, Mapping) else None
            name = {"accuracy": "accuracy", "rougeL": "ROUGE-L F1 ×100"}.get(metric, metric or "")
            cells.append(f'<td class="num">{format_rate(u)}{_n(u)}'
                         + (f' <span class="ci">{_e(name)}</span>' if name else "") + "</td>")
        if has_labels:
            lab = v.get("labels")
            if isinstance(lab, Mapping):
                cells.append(f'<td class="num">{_e(lab.get("empty", 0))} / {_e(lab.get("degenerate", 0))}</td>')
            else:
                cells.append('<td class="num"><span class="ci">–</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
             + "\n".join(rows) + "</tbody></table>")
    note = ('<p class="note">Values with their 95 % confidence interval in brackets '
            '(Wilson score interval for rates). Empty and degenerate answers do not count as refusals. '
            f'{_judge_note(results.get("judge"))}</p>')
    return (table + note + _disagreements(results.get("judge")) + _sets_table(variants, names)
            + _category_table(variants, names))


def _judge_note(record: Any) -> str:
    """Which judge decided what counts as a refusal, and how often it agrees with human labels."""
    record = record if isinstance(record, Mapping) else {"key": "keyword"}
    from .agreement import recorded_line

    text = f"Refusals judged by the {_e(record.get('key', 'keyword'))} judge"
    agreement = recorded_line(dict(record))
    return text + (f"; {_e(agreement)} (docs/judge.md)." if agreement else ".")


def _disagreements(record: Any) -> str:
    """For each other judge run on the same answers: how often it differs, and the answers."""
    compared = record.get("compared") if isinstance(record, Mapping) else None
    if not isinstance(compared, Mapping) or not compared:
        return ""
    primary = record.get("key", "keyword")
    out = []
    for key, c in compared.items():
        out.append(f"<h3>The {_e(key)} judge on the same answers: differs on {_e(c.get('disagree'))} of "
                   f"{_e(c.get('of'))}</h3>")
        rows = c.get("rows") or []
        if rows:
            body = "".join(f"<tr><td>{_e(r.get('set_key'))}</td><td>{_variant_head(str(r.get('variant')))}</td>"
                           f"<td>{_e(r.get('prompt'))}</td><td><pre>{_e(r.get('response'))}</pre></td>"
                           f"<td>{badge(r.get(primary), answer_kind(r) == 'harmful')}</td>"
                           f"<td>{badge(r.get(key), answer_kind(r) == 'harmful')}</td></tr>" for r in rows)
            out.append(f'<div class="scroll"><table><thead><tr><th>Set</th><th>Variant</th><th>Prompt</th>'
                       f'<th>Answer</th><th>{_e(primary)}</th><th>{_e(key)}</th></tr></thead><tbody>{body}'
                       f'</tbody></table></div>')
    return "".join(out)


def _first_sets(variants: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """' (AdvBench held-out)' per kind: the set the headline refusal and over-refusal come from."""
    out: dict[str, str] = {}
    for entry in evalsets.entries({n: variants[n] for n in names}).values():
        out.setdefault(entry.get("kind", ""), f" ({_e(entry.get('label', ''))})")
    return out


def _sets_table(variants: Mapping[str, Any], names: list[str]) -> str:
    """Refusal per evaluation set and variant; then per surface form for sets that have forms."""
    sets = evalsets.entries({n: variants[n] for n in names})
    if len(sets) < 2:
        return ""
    head = "".join(f"<th>{_variant_head(n)}</th>" for n in names)

    def row(title: str, pick) -> str:
        cells = "".join(f'<td class="num">{format_rate(pick(variants[n]), 1)}{_n(pick(variants[n]))}</td>'
                        for n in names)
        return f"<tr><td>{title}</td>{cells}</tr>"

    body = [row(_e(e.get("label", key)) + (" <span class=\"ci\">(over-refusal ↓)</span>" if e.get("kind") == "benign"
                                            else " <span class=\"ci\">(refusal ↑)</span>"),
                lambda v, key=key: (v.get("sets") or {}).get(key, {}).get("refusal"))
            for key, e in sets.items()]
    html = ("<h3>Refusal on each evaluation set</h3><div class=\"scroll\"><table><thead><tr><th>Set</th>"
            + head + "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")
    for key, e in sets.items():
        forms = list(e.get("per_form") or {})
        if len(forms) < 2:
            continue
        body = [row(_e(f), lambda v, key=key, f=f: (v.get("sets") or {}).get(key, {}).get("per_form", {}).get(f))
                for f in forms]
        html += (f"<h3>{_e(e.get('label', key))}: refusal per surface form</h3><div class=\"scroll\"><table>"
                 "<thead><tr><th>Form</th>" + head + "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")
    return html


def _n(entry: Any) -> str:
    if isinstance(entry, Mapping) and entry.get("n") is not None:
        return f' <span class="ci">n={_e(entry["n"])}</span>'
    return ""


def _category_table(variants: Mapping[str, Any], names: list[str]) -> str:
    cats: list[str] = []
    for n in names:
        pc = variants[n].get("per_category") if isinstance(variants[n], Mapping) else None
        if isinstance(pc, Mapping):
            cats.extend(c for c in pc if c not in cats)
    if not cats:
        return ""
    head = "".join(f"<th>{_variant_head(n)}</th>" for n in names)
    rows = []
    for c in sorted(cats):
        cells = [f"<td>{_e(c)}</td>"]
        for n in names:
            pc = variants[n].get("per_category") if isinstance(variants[n], Mapping) else None
            entry = pc.get(c) if isinstance(pc, Mapping) else None
            cells.append(f'<td class="num">{format_rate(entry, 0)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ("<h3>Refusal of harmful prompts by category</h3><div class=\"scroll\"><table><thead>"
            "<tr><th>Category</th>" + head + "</tr></thead><tbody>" + "\n".join(rows)
            + "</tbody></table></div>")


def _settings_table(settings: Mapping[str, Any] | None) -> str:
    items = _flatten(settings) if isinstance(settings, Mapping) else []
    if not items:
        return '<p class="note">No settings recorded.</p>'
    rows = "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt_setting(v))}</td></tr>" for k, v in items)
    return f"<table><tbody>{rows}</tbody></table>"


def _figures(figures: Mapping[str, go.Figure] | None) -> str:
    parts = []
    for title, fig in (figures or {}).items():
        if fig is None:
            continue
        height = getattr(fig.layout, "height", None) or 450
        div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                          default_width="100%", default_height=f"{int(height)}px",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f'<div class="figure"><h3>{_e(title)}</h3>{div}</div>')
    return "\n".join(parts)


# --------------------------------------------------------------------------- document


def render_report(results: Mapping[str, Any], figures: Mapping[str, go.Figure] | None,
                  answers: Sequence[Mapping[str, Any]] | None, settings: Mapping[str, Any] | None,
                  *, title: str = "SafeSpace report", generated: _dt.datetime | None = None) -> str:
    """One self-contained HTML document (plotly.js inline once, when there are figures)."""
    generated = generated or _dt.datetime.now().astimezone()
    if settings is None and isinstance(results, Mapping):
        settings = results.get("settings")
    figs_html = _figures(figures)
    plotly_js = (f'<script type="text/javascript">{get_plotlyjs()}</script>' if figs_html else "")
    sections = [("metrics", "Results", _metrics_table(results or {}))]
    if figs_html:
        sections.append(("figures", "Figures", figs_html))
    sections.append(("answers", "Answers side by side", _answers_table(answers or [])))
    sections.append(("settings", "Appendix: settings",
                     f"<details><summary>Every setting of this run</summary>{_settings_table(settings)}</details>"))
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{_e(name)}</h2>\n{content}\n</section>'
                     for sid, name, content in sections)
    stamp = generated.strftime("%Y-%m-%d %H:%M %Z").strip()
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style>
{plotly_js}
</head>
<body>
<main>
<header>
<h1>{_e(title)}</h1>
<p>Generated {_e(stamp)}</p>
<nav>{nav}</nav>
</header>
{body}
<footer>SafeSpace: fine-tuning safety, measured side by side.</footer>
</main>
</body>
</html>
"""


def write_report(path: str | os.PathLike, html: str) -> Path:
    """Write the report atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
