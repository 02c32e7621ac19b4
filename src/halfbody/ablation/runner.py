"""One table run: each row trained in a subprocess of its own (or collected / resumed), its test list generated
and evaluated in-process, a record per row and the table written after every row (see :mod:`halfbody.ablate`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from halfbody.utils.errors import UserError, find_user_error
from halfbody.utils.hydra import REPO_ROOT, instantiate_group
from halfbody.utils.io import atomic_output

from .compose import compose_entry, hydra_value
from .render import note, render_markdown, table_data
from .table import Row, override_list, table_columns, table_rows

__all__ = ["RowFailed", "TableRunner", "failure_line", "git_commit"]

log = logging.getLogger(__name__)


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """``<sha>`` of the checkout halfbody runs from, ``<sha>+dirty`` with uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def failure_line(output: str, returncode: int | None) -> str:
    """One line saying why a train subprocess failed: its ``error: ...`` line (a UserError), else the last
    exception line of its traceback, else its exit code."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[len("error: "):]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*", ln):
            return ln
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}" + (f": {lines[-1]}" if lines else "")



class RowFailed(Exception):
    """A row's step failed; the message is the one line the table shows."""

    def __init__(self, stage: str, reason: str):
        self.stage, self.reason = stage, reason
        super().__init__(f"{stage}: {reason}")


class TableRunner:
    """Runs the rows of one table config (see :mod:`halfbody.ablate`)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.rows = table_rows(cfg)
        self.columns = table_columns(cfg)
        self.out = Path(os.path.expanduser(str(cfg.output_dir))).resolve()
        self.preset = cfg.get("train_preset")
        self.train_overrides = override_list(cfg.get("train_overrides"), "train_overrides")
        self.generate_overrides = override_list(cfg.get("generate_overrides"), "generate_overrides")
        self.evaluate_overrides = override_list(cfg.get("evaluate_overrides"), "evaluate_overrides")
        only = cfg.get("only")
        self.only = None if only is None else {str(x) for x in (only if isinstance(only, (list, ListConfig))
                                                               else [only])}
        self.python = str(cfg.get("python") or sys.executable)
        timeout = cfg.get("train_timeout_s")
        self.train_timeout = float(timeout) if timeout else None
        self.commit = git_commit()
        self.test_list: Path | None = None
        self.records: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------ test list
    def resolve_test_list(self) -> Path:
        if self.cfg.get("test_list"):
            p = Path(os.path.expanduser(str(self.cfg.test_list))).resolve()
            if not p.is_file():
                raise UserError(f"test_list={str(self.cfg.test_list)!r}: no such file")
            return p
        from halfbody.data.test_set import export_test_set

        data = self.cfg.get("data")
        if data is None or not data.get("val_shards"):
            raise UserError("test_list is null and data.val_shards is not set: give test_list=<EMTD-style list> or "
                            "the held-out shards as data.val_shards=<dir or pattern>")
        if data.get("prepare") is not None:  # e.g. the synthetic world's generator (a no-op once complete)
            hydra.utils.instantiate(data.prepare)()
        ts = self.cfg.get("test_set") or {}
        kinds = ts.get("kinds", ["halfbody"])
        return export_test_set(OmegaConf.to_container(data.val_shards, resolve=True)
                               if isinstance(data.val_shards, ListConfig) else str(data.val_shards),
                               self.out / "test_set", max_clips=ts.get("max_clips"),
                               kinds=None if kinds is None else [str(k) for k in kinds],
                               max_seconds=ts.get("max_seconds")).resolve()

    # ------------------------------------------------------------------------------------------ train
    def train_argv(self, row: Row) -> list[str]:
        """The row's ``halfbody.train`` overrides (without the run folder): what a finished run is matched on."""
        argv = [f"experiment={row.experiment}"]
        for key in ("data_dir", "pretrained_dir"):  # this machine's folders, as this call sees them
            value = OmegaConf.select(self.cfg, f"paths.{key}")
            if value:
                argv.append(f"paths.{key}={hydra_value(str(Path(str(value)).resolve()))}")
        if self.preset:
            argv.append(f"preset={self.preset}")
        return argv + self.train_overrides + row.overrides

    def train(self, row: Row, row_dir: Path) -> dict[str, Any]:
        """Train (or collect / resume) the row's run; ``{"mode", "checkpoint", "config", "command", ...}``."""
        if row.checkpoint:
            ckpt = Path(os.path.expanduser(row.checkpoint)).resolve()
            if not ckpt.is_file():
                raise RowFailed("collect", f"table.rows[{row.index}].checkpoint={row.checkpoint!r}: no such file")
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
            config = run / ".hydra" / "config.yaml" if run is not None else None
            trained = _read_json(run.parent / "train.json") if run is not None else None  # a run of ablate's
            return {"mode": "collected", "checkpoint": str(ckpt),
                    "config": str(config) if config is not None and config.is_file() else None,
                    "command": (trained or {}).get("command"), "commit": (trained or {}).get("commit"),
                    "train_s": 0.0, "trained_s": (trained or {}).get("train_s")}
        run_dir = row_dir / "run"
        last = run_dir / "checkpoints" / "last.ckpt"
        argv = self.train_argv(row)
        done_path = row_dir / "train.json"
        done = _read_json(done_path)
        if done is not None and done.get("argv") != argv and run_dir.exists():
            raise RowFailed("train", f"{run_dir} was trained with other settings ({' '.join(done.get('argv') or [])}"
                            f"); delete {row_dir} to retrain this row, or set another output_dir")
        if last.is_file() and done is not None and done.get("returncode") == 0:
            return {**done, "mode": "collected", "train_s": 0.0, "trained_s": done.get("train_s")}
        resume = last.is_file()  # an interrupted run of the same command: Lightning resumes it
        cmd = [self.python, "-m", "halfbody.train", *argv, f"hydra.run.dir={hydra_value(str(run_dir))}"]
        if resume:
            cmd.append(f"ckpt_path={hydra_value(str(last))}")
        printable = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
        log.info("%s: %s%s", row.name, "resuming: " if resume else "", printable)
        row_dir.mkdir(parents=True, exist_ok=True)
        _write_json(done_path, {"argv": argv, "command": printable, "returncode": None, "commit": self.commit,
                                "started": _dt.datetime.now().isoformat(timespec="seconds")})
        t0 = time.monotonic()
        with open(row_dir / "train.log", "ab") as logf:
            logf.write(f"\n$ {printable}\n".encode())
            logf.flush()
            try:
                proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                      timeout=self.train_timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                rc: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        train_s = time.monotonic() - t0
        info = {"argv": argv, "command": printable, "returncode": rc, "commit": self.commit, "train_s": train_s,
                "checkpoint": str(last), "config": str(run_dir / ".hydra" / "config.yaml"),
                "finished": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json(done_path, info)
        if rc is None:
            raise RowFailed("train", f"ran longer than train_timeout_s={self.train_timeout:g} (log: "
                            f"{row_dir / 'train.log'})")
        if rc != 0:
            tail = (row_dir / "train.log").read_bytes()[-20000:].decode(errors="replace")
            raise RowFailed("train", failure_line(tail, rc))
        if not last.is_file():
            raise RowFailed("train", f"finished without {last}")
        return {**info, "mode": "resumed" if resume else "trained"}

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, row: Row, row_dir: Path, ckpt: str) -> dict[str, Any]:
        from halfbody.generate import generate

        gen_dir = row_dir / "generated"
        stamp = {"checkpoint": ckpt, "checkpoint_mtime": os.path.getmtime(ckpt),
                 "overrides": self.generate_overrides, "test_list": str(self.test_list)}
        stamp_path = gen_dir / "generated_with.json"
        fresh = _read_json(stamp_path) != stamp  # other weights or settings: every video is made again
        cfg = compose_entry("generate", self.generate_overrides, gen_dir, "generate_overrides")
        with open_dict(cfg):
            cfg.ckpt_path = ckpt
            cfg.list = str(self.test_list)
            cfg.output_dir = str(gen_dir)
            cfg.overwrite = bool(fresh)
            cfg.progress = False
        gen_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            stamp_path.unlink(missing_ok=True)
        summary = generate(cfg)
        _write_json(stamp_path, stamp)
        failed = summary.get("failed") or []
        if failed:
            total = len(failed) + len(summary.get("generated") or []) + len(summary.get("skipped") or [])
            raise RowFailed("generate", f"{len(failed)} of {total} test clips failed: {failed[0]}")
        return {"generated_dir": str(gen_dir), "videos": len(summary.get("generated") or [])
                + len(summary.get("skipped") or [])}

    # ------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, row_dir: Path) -> dict[str, Any]:
        from halfbody.evaluate import evaluate

        eval_dir = row_dir / "eval"
        # the table logs one W&B table for all rows; evaluate_overrides=[logger=wandb] gives each row its own too
        cfg = compose_entry("evaluate", ["logger=none", *self.evaluate_overrides], eval_dir, "evaluate_overrides")
        with open_dict(cfg):
            cfg.generated = str(row_dir / "generated")
            cfg.list = str(self.test_list)
            cfg.output_dir = str(eval_dir)
        result = evaluate(cfg)
        metrics = {str(k): (None if v is None else float(v)) for k, v in (result.get("metrics") or {}).items()}
        return {"metrics": metrics, "skipped_metrics": dict(result.get("skipped") or {}),
                "protocol": result.get("protocol"), "eval_dir": str(eval_dir)}

    # ------------------------------------------------------------------------------------------ row
    def settings(self, row: Row) -> dict[str, Any]:
        """Everything a finished row's numbers depend on (a re-run with other settings redoes the row)."""
        return {"experiment": row.experiment, "checkpoint": row.checkpoint, "train": self.train_argv(row)
                if not row.checkpoint else None, "generate": self.generate_overrides,
                "evaluate": self.evaluate_overrides, "test_list": str(self.test_list)}

    def check_row(self, row: Row) -> str | None:
        """Why the row's train config does not compose (an unknown experiment, a bad override), else None."""
        if row.checkpoint:
            return None
        where = f"table.rows[{row.index}] (experiment={row.experiment}, overrides={row.overrides})"
        try:
            cfg = compose_entry("train", self.train_argv(row), self.out, "train_overrides", where=where,
                                keep_hydra=True)
        except UserError as e:
            return str(e)
        family = OmegaConf.select(cfg, "hydra.runtime.choices.family")
        wanted = self.cfg.table.get("family")
        if wanted and family and str(family) != str(wanted):
            return f"{where}: trains the {family} family, the table {self.cfg.table.name} is of {wanted}"
        return None

    def fail_early(self, row: Row, reason: str, position: str) -> dict[str, Any]:
        record = {"id": row.id, "name": row.name, "index": row.index, "experiment": row.experiment,
                  "overrides": row.overrides, "settings": self.settings(row), "status": "failed", "stage": "config",
                  "error": reason, "skipped": False, "command": "python -m halfbody.train " + " ".join(
                      shlex.quote(a) for a in self.train_argv(row))}
        log.error("%s %s: failed at config: %s", position, row.name, reason)
        print(f"error: {row.name}: config: {reason}", file=sys.stderr, flush=True)
        _write_json(self.out / "rows" / row.id / "row.json", record)
        return record

    def run_row(self, row: Row, position: str) -> dict[str, Any]:
        row_dir = self.out / "rows" / row.id
        record_path = row_dir / "row.json"
        previous = _read_json(record_path)
        settings = self.settings(row)
        if (previous is not None and previous.get("status") == "ok" and previous.get("settings") == settings
                and previous.get("checkpoint") and Path(previous["checkpoint"]).is_file()):
            log.info("%s %s: finished earlier, skipped (%s)", position, row.name, record_path)
            return {**previous, "skipped": True}
        record: dict[str, Any] = {"id": row.id, "name": row.name, "index": row.index, "experiment": row.experiment,
                                  "overrides": row.overrides, "settings": settings, "status": "running",
                                  "skipped": False, "started": _dt.datetime.now().isoformat(timespec="seconds")}
        stage = "train"
        t_row = time.monotonic()
        try:
            log.info("%s %s: train", position, row.name)
            info = self.train(row, row_dir)
            record.update(mode=info["mode"], checkpoint=info["checkpoint"], config=info.get("config"),
                          command=info.get("command"), commit=info.get("commit"), train_s=info.get("train_s"),
                          trained_s=info.get("trained_s", info.get("train_s")))
            stage = "generate"
            log.info("%s %s: generate (%s)", position, row.name, info["checkpoint"])
            t0 = time.monotonic()
            record.update(self.generate(row, row_dir, info["checkpoint"]))
            record["generate_s"] = time.monotonic() - t0
            stage = "evaluate"
            log.info("%s %s: evaluate", position, row.name)
            t0 = time.monotonic()
            record.update(self.evaluate(row_dir))
            record["evaluate_s"] = time.monotonic() - t0
            record["status"] = "ok"
        except RowFailed as e:
            record.update(status="failed", stage=e.stage, error=e.reason)
        except Exception as e:  # a crash in generate / evaluate fails this row only
            user = find_user_error(e)
            reason = str(user) if user is not None else f"{type(e).__name__}: {e}"
            record.update(status="failed", stage=stage, error=reason.splitlines()[0] if reason else type(e).__name__)
            row_dir.mkdir(parents=True, exist_ok=True)
            (row_dir / f"{stage}_error.txt").write_text(traceback.format_exc())
        finally:
            gc.collect()
        record["wall_s"] = time.monotonic() - t_row
        record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        if record["status"] == "failed":
            log.error("%s %s: failed at %s: %s", position, row.name, record["stage"], record["error"])
            print(f"error: {row.name}: {record['stage']}: {record['error']}", file=sys.stderr, flush=True)
        else:
            log.info("%s %s: done in %.0f s", position, row.name, record["wall_s"])
        _write_json(record_path, record)
        return record

    # ------------------------------------------------------------------------------------------ table
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.test_list = self.resolve_test_list()
        log.info("table %s: %d rows, test list %s, output %s", self.cfg.table.name, len(self.rows), self.test_list,
                 self.out)
        todo = [r for r in self.rows if self.only is None or r.id in self.only]
        bad = {r.id: self.check_row(r) for r in todo}  # every row's config, before the first row trains
        for n, row in enumerate(todo, start=1):
            if bad[row.id]:
                self.records[row.id] = self.fail_early(row, bad[row.id], f"[{n}/{len(todo)}]")
            else:
                self.records[row.id] = self.run_row(row, f"[{n}/{len(todo)}]")
            self.write()
        for row in self.rows:  # rows outside `only`: their earlier results, if any
            if row.id not in self.records:
                prev = _read_json(self.out / "rows" / row.id / "row.json")
                if prev is not None and prev.get("settings") == self.settings(row):
                    self.records[row.id] = {**prev, "skipped": True}
        table = self.write()
        self.log_wandb(table)
        failed = [r for r in table["rows"] if r["status"] == "failed"]
        line = (f"table {self.cfg.table.name}: {sum(r['status'] == 'ok' for r in table['rows'])} rows done "
                f"({sum(bool(r.get('skipped')) for r in table['rows'])} from earlier runs), {len(failed)} failed, "
                f"{sum(r['status'] == 'not run' for r in table['rows'])} not run -> {self.out / 'table.md'}")
        log.info(line)
        print(line, file=sys.stderr, flush=True)
        return table

    def label(self) -> str | None:
        if self.cfg.get("label"):
            return str(self.cfg.label)
        if self.preset and "tiny" in str(self.preset):
            return (f"preset={self.preset}: tiny models trained on CPU, not at the paper's scale; these are tiny-model "
                    "numbers, not comparable with the paper's.")
        if self.preset:
            return f"preset={self.preset}"
        return None

    def table_rows(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            rec = self.records.get(row.id) or {"id": row.id, "name": row.name, "index": row.index,
                                               "experiment": row.experiment, "status": "not run"}
            out.append(rec)
        return out

    def write(self) -> dict[str, Any]:
        rows = self.table_rows()
        known = {c.metric for c in self.columns}
        extra = sorted({m for r in rows for m in (r.get("metrics") or {}) if m not in known})
        skipped_metrics: dict[str, str] = {}
        for r in rows:
            for m, why in (r.get("skipped_metrics") or {}).items():
                skipped_metrics.setdefault(str(m), str(why))
        table = {
            "table": str(self.cfg.table.name), "title": str(self.cfg.table.get("title") or self.cfg.table.name),
            "source": self.cfg.table.get("source"), "label": self.label(),
            "first_column": str(self.cfg.table.get("first_column") or "Methods"),
            "columns": [{"label": c.label, "metric": c.metric, "better": c.better} for c in self.columns],
            "extra_columns": extra, "test_list": str(self.test_list), "output_dir": str(self.out),
            "commit": self.commit, "written": _dt.datetime.now().isoformat(timespec="seconds"),
            "rows": rows, "skipped_metrics": skipped_metrics,
            "published": OmegaConf.to_container(self.cfg.table.get("published") or [], resolve=True),
        }
        _write_json(self.out / "table.json", table)
        with atomic_output(self.out / "table.md") as tmp:
            tmp.write_text(render_markdown(table, self.columns))
        return table

    def log_wandb(self, table: dict[str, Any]) -> None:
        loggers = [lg for lg in instantiate_group(self.cfg.get("logger"), "logger")
                   if type(lg).__name__ == "WandbLogger"]
        if not loggers:
            return
        header, data = table_data(table, self.columns)
        runs_header = ["id", "name", "status", "note", "checkpoint", "config", "command", "commit", "train_s",
                       "generate_s", "evaluate_s"]
        runs = [[r.get("id"), r.get("name"), r.get("status"), note(r), r.get("checkpoint"), r.get("config"),
                 r.get("command"), r.get("commit"), r.get("train_s"), r.get("generate_s"), r.get("evaluate_s")]
                for r in table["rows"]]
        for lg in loggers:
            lg.log_table(key=f"table/{table['table']}", columns=header, data=data)
            lg.log_table(key=f"table/{table['table']}_runs", columns=runs_header, data=runs)
            lg.finalize("success")
        with contextlib.suppress(Exception):
            import wandb

            wandb.finish()
