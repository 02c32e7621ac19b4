"""Ablation tables (``python -m halfbody.ablate``, the thin Hydra entry): the paper's rows trained (or collected),
generated with and scored, one table per ``conf/table/<table>.yaml``.

- :mod:`~halfbody.ablation.table`: the table's spec (:class:`Row`, :class:`Column`), checked;
- :mod:`~halfbody.ablation.compose`: the other entry points' configs composed in-process;
- :mod:`~halfbody.ablation.runner`: :class:`TableRunner` (train / generate / evaluate per row, records, resumption);
- :mod:`~halfbody.ablation.render`: ``table.md`` and the W&B table.
"""

from .compose import compose_entry
from .render import render_markdown, table_data
from .runner import RowFailed, TableRunner, failure_line, git_commit
from .table import Column, Row, table_columns, table_rows

__all__ = ["Column", "Row", "RowFailed", "TableRunner", "compose_entry", "failure_line", "git_commit",
           "render_markdown", "table_columns", "table_data", "table_rows"]
