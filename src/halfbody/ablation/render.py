"""The table as markdown (``table.md``) and as a header and rows of values (the W&B table)."""

from __future__ import annotations

import math
from typing import Any

from .table import Column

__all__ = ["note", "render_markdown", "table_data"]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.2f}" if abs(v) >= 100 else f"{v:.3f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def note(r: dict[str, Any]) -> str:
    if r.get("status") == "failed":
        return f"failed ({r.get('stage')}): {r.get('error')}"
    if r.get("status") == "not run":
        return "not run"
    return ""


def table_data(table: dict[str, Any], columns: list[Column]) -> tuple[list[str], list[list[Any]]]:
    """The table as a header and rows of values (None where a row has no number): the W&B table."""
    header = [str(table.get("first_column") or "Methods"), *[c.header for c in columns], *table["extra_columns"],
              "note"]
    data = []
    for r in table["rows"]:
        m = r.get("metrics") or {}
        data.append([r["name"], *[m.get(c.metric) for c in columns], *[m.get(x) for x in table["extra_columns"]],
                     note(r)])
    return header, data


def render_markdown(table: dict[str, Any], columns: list[Column]) -> str:
    lines = [f"# {table['title']}", ""]
    if table.get("label"):
        lines += [f"**{table['label']}**", ""]
    lines += [f"Rows and columns in the order of {table.get('source') or 'the paper'}. Test list: "
              f"`{table['test_list']}`. Commit: `{table.get('commit')}`. Written {table['written']} by "
              "`python -m halfbody.ablate` (settings and per-row records: `table.json`, `rows/<id>/row.json`).", ""]
    header, data = table_data(table, columns)
    lines.append("| " + " | ".join(_cell(h) for h in header) + " |")
    lines.append("|---" + "|---:" * (len(header) - 2) + "|---|")
    for values in data:
        cells = [_cell(values[0]), *[_fmt(v) for v in values[1:-1]], _cell(values[-1])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if table.get("extra_columns"):
        lines += [f"Columns after {columns[-1].header} are further metrics of `halfbody.evaluate` that the paper does "
                  "not report (e.g. the synthetic world's oracle metrics).", ""]
    if table.get("skipped_metrics"):
        lines.append("Metrics not computed:")
        lines += [f"- `{m}`: {why}" for m, why in table["skipped_metrics"].items()]
        lines.append("")
    lines += ["## Runs", "",
              "| row | status | mode | checkpoint | config | commit | train s | generate s | evaluate s |",
              "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in table["rows"]:
        status = r.get("status", "")
        if status == "failed":
            status = f"failed ({r.get('stage')}): {r.get('error')}"
        elif r.get("skipped"):
            status += " (earlier run)"
        lines.append("| " + " | ".join(_cell(x) for x in [
            r.get("name"), status, r.get("mode") or "", f"`{r['checkpoint']}`" if r.get("checkpoint") else "",
            f"`{r['config']}`" if r.get("config") else "", r.get("commit") or "",
            *[f"{r[k]:.0f}" if isinstance(r.get(k), (int, float)) else "" for k in ("trained_s", "generate_s",
                                                                                   "evaluate_s")]]) + " |")
    lines.append("")
    published = table.get("published") or []
    if published:
        lines += ["## As published (paper scale, EMTD)", "",
                  "| " + " | ".join([str(table.get("first_column") or "Methods"), *[c.header for c in columns]]) + " |",
                  "|---" + "|---:" * len(columns) + "|"]
        for p in published:
            lines.append("| " + " | ".join([_cell(p.get("name", "")), *[str(v) for v in p.get("values", [])]]) + " |")
        lines.append("")
    return "\n".join(lines)
