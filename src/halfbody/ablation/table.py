"""The table's spec: the rows and columns of ``conf/table/<table>.yaml``, checked (the paper's rows in its order:
EchoMimicV2 Table 2, MirrorMe Table 1)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig

from halfbody.utils.errors import UserError

__all__ = ["ARROWS", "ROW_ID", "Column", "Row", "override_list", "table_columns", "table_rows"]

ROW_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
ARROWS = {"lower": "↓", "higher": "↑"}

@dataclass
class Row:
    """One row of a table config: a model to train (or collect), generate with and score."""

    index: int
    id: str
    name: str
    experiment: str | None
    overrides: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # collect this checkpoint instead of training


@dataclass
class Column:
    label: str
    metric: str
    better: str  # lower | higher

    @property
    def header(self) -> str:
        return f"{self.label}{ARROWS[self.better]}"


def override_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple, ListConfig)):
        raise UserError(f"{key}={value!r}: expected a list of overrides, e.g. [trainer.max_steps=10]")
    return [str(v) for v in value]


def table_rows(cfg: DictConfig) -> list[Row]:
    """The rows of ``cfg.table``, checked (unique file-name-safe ids, an experiment or a checkpoint each)."""
    rows_cfg = cfg.table.get("rows")
    if not rows_cfg:
        raise UserError(f"table.rows: table {cfg.table.get('name')!r} has no rows")
    rows, seen = [], {}
    for i, r in enumerate(rows_cfg):
        key = f"table.rows[{i}]"
        if not isinstance(r, DictConfig):
            raise UserError(f"{key}={r!r}: expected a mapping with id, name, experiment (and optional overrides, "
                            "checkpoint)")
        rid = str(r.get("id") or "")
        if not ROW_ID.match(rid):
            raise UserError(f"{key}.id={rid!r}: expected a file-name-safe id (letters, digits, _ . -)")
        if rid in seen:
            raise UserError(f"{key}.id={rid!r}: also the id of table.rows[{seen[rid]}]")
        seen[rid] = i
        if not r.get("experiment") and not r.get("checkpoint"):
            raise UserError(f"{key}: needs an experiment (conf/experiment/) or a checkpoint to collect")
        rows.append(Row(index=i, id=rid, name=str(r.get("name") or rid), experiment=r.get("experiment"),
                        overrides=override_list(r.get("overrides"), f"{key}.overrides"),
                        checkpoint=str(r.checkpoint) if r.get("checkpoint") else None))
    only = cfg.get("only")
    if only is not None:
        ids = [str(x) for x in (only if isinstance(only, (list, ListConfig)) else [only])]
        unknown = [x for x in ids if x not in seen]
        if unknown:
            raise UserError(f"only={list(ids)}: no row {unknown[0]!r} in table {cfg.table.name!r} (ids: {list(seen)})")
    return rows


def table_columns(cfg: DictConfig) -> list[Column]:
    cols = []
    for i, c in enumerate(cfg.table.get("columns") or []):
        better = str(c.get("better", ""))
        if better not in ARROWS:
            raise UserError(f"table.columns[{i}].better={better!r}: expected lower or higher (the paper's ↓ / ↑)")
        if not c.get("metric"):
            raise UserError(f"table.columns[{i}]: needs metric (the name halfbody.evaluate reports)")
        cols.append(Column(label=str(c.get("label") or c.metric), metric=str(c.metric), better=better))
    if not cols:
        raise UserError(f"table.columns: table {cfg.table.get('name')!r} has no columns")
    return cols
