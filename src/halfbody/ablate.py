"""Ablation-table entry point: ``python -m halfbody.ablate table=echomimic_v2_table2 [train_preset=tiny_cpu]``.

It only composes and runs (lightning-hydra-template style): the work is in :mod:`halfbody.ablation` (the
table's spec, the runner, the rendering), and each row's steps are the other entry points. For every row of
``conf/table/<table>.yaml`` (the paper's rows, in its order: EchoMimicV2 Table 2, MirrorMe Table 1):

1. **train**: ``python -m halfbody.train experiment=<row> [preset=<train_preset>] <train_overrides> <row overrides>``
   in a subprocess of its own (a crash in one row does not stop the table), into ``<output_dir>/rows/<id>/run``; or
   **collect** a finished run: the row's ``checkpoint`` key, or a run of an earlier call that finished with the same
   command line. An interrupted run resumes from its ``last.ckpt``.
2. **generate** the test list with the row's checkpoint (:func:`halfbody.generate.generate`), into ``generated/``;
3. **evaluate** the videos against the list's ground truth (:func:`halfbody.evaluate.evaluate`), into ``eval/``;
4. write ``rows/<id>/row.json`` (status, checkpoint, run config, command, commit, wall times, metrics) and the
   table: ``table.md`` and ``table.json`` after every row, a W&B table at the end when a wandb logger is on.

A row that fails at any step is in the table with one line saying why; the other rows go on. A re-run with the same
``output_dir`` skips finished rows (same settings) and retries failed ones. The test list is ``test_list``, else the
held-out clips of ``data.val_shards`` exported as real files (:mod:`halfbody.data.test_set`).
Settings: ``conf/ablate.yaml``. A bad table or setting ends in one line, ``error: <key>=<value>: ...``, exit code 2.
"""

from __future__ import annotations

import signal
from typing import Any

import hydra
from omegaconf import DictConfig

from halfbody.ablation import TableRunner
from halfbody.utils.errors import exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR

__all__ = ["ablate", "main"]


def ablate(cfg: DictConfig) -> dict[str, Any]:
    """Build the table ``cfg.table`` (see the module docstring). Returns the table (as written to ``table.json``).
    Raises ``UserError`` for a bad table or setting; a failing row is a row of the table, not an exception."""
    return TableRunner(cfg).run()


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through subprocess.run, which kills the row's train process


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="ablate")
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with exit_on_user_error():
        table = ablate(cfg)
    if any(r["status"] == "failed" for r in table["rows"]):
        raise SystemExit(2)


if __name__ == "__main__":
    main()
