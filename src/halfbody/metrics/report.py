"""The outputs of ``python -m halfbody.evaluate``: ``metrics.json`` (strict JSON: nan / inf written as null),
``metrics.md`` (a markdown table in the papers' column order) and a W&B table when a wandb logger is configured."""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from halfbody.utils.io import atomic_output

__all__ = ["finite", "log_wandb", "markdown_table", "write_report"]

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def markdown_table(result: dict[str, Any]) -> str:
    """The run's table: one row of metrics (paper column order, arrows: which way is better), per-video rows,
    and the skipped metrics with their reasons."""
    from halfbody.metrics.evaluation import HIGHER_IS_BETTER, METRIC_ORDER

    metrics = result["metrics"]
    cols = [m for m in METRIC_ORDER if m in metrics] + [m for m in metrics if m not in METRIC_ORDER]
    arrow = {m: ("↑" if HIGHER_IS_BETTER.get(m) else "↓") if m in HIGHER_IS_BETTER else "" for m in cols}
    lines = ["| videos | " + " | ".join(f"{m}{arrow[m]}" for m in cols) + " |",
             "|---|" + "---|" * len(cols),
             f"| {len(result['per_video'])} | " + " | ".join(_fmt(metrics[m]) for m in cols) + " |", ""]
    per = result["per_video"]
    pcols = [m for m in cols if m not in ("FID", "FVD")]
    if per and pcols:
        lines += ["| video | frames | " + " | ".join(pcols) + " |", "|---|---|" + "---|" * len(pcols)]
        for name, row in per.items():
            lines.append(f"| {name} | {row.get('frames', '–')} | " + " | ".join(_fmt(row.get(m)) for m in pcols) + " |")
        lines.append("")
    if result["skipped"]:
        lines += ["Skipped:", ""] + [f"- {m}: {why}" for m, why in result["skipped"].items()] + [""]
    return "\n".join(lines)


def log_wandb(cfg: DictConfig, result: dict[str, Any]) -> None:
    """A W&B table of the per-video values and the run's metrics, when a wandb logger is configured."""
    from halfbody.utils.hydra import instantiate_group

    if not cfg.get("logger"):
        return
    loggers = instantiate_group(cfg.logger, "logger")
    metrics = result["metrics"]
    cols = list(metrics)
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        rows = [[name, row.get("frames")] + [row.get(m) for m in cols] for name, row in result["per_video"].items()]
        lg.log_table("eval/per_video", columns=["video", "frames"] + cols, data=rows)
        lg.log_table("eval/metrics", columns=cols, data=[[metrics[m] for m in cols]])
        lg.log_metrics({f"eval/{m}": v for m, v in metrics.items()})
        lg.finalize("success")
        try:
            lg.experiment.finish()
        except Exception:  # noqa: BLE001 - a disabled / offline run may not finish cleanly; the files are written
            pass


def write_report(cfg: DictConfig, result: dict[str, Any], inputs: dict[str, Any], problems: list[str],
                 device: torch.device) -> Path:
    """Write ``metrics.json`` and ``metrics.md`` in ``cfg.output_dir`` (else ``paths.output_dir``), log the W&B table,
    and say what was scored; returns the output folder."""
    out_dir = Path(os.path.expanduser(str(cfg.get("output_dir") or cfg.paths.output_dir)))
    record = {**result, "inputs": inputs, "problems": problems, "device": str(device),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "metrics_config": OmegaConf.to_container(cfg.metrics, resolve=True)}
    with atomic_output(out_dir / "metrics.json") as tmp:  # strict JSON: nan / inf are written as null
        tmp.write_text(json.dumps(finite(record), indent=2, allow_nan=False, default=str))
    with atomic_output(out_dir / "metrics.md") as tmp:
        tmp.write_text(markdown_table(result))
    log_wandb(cfg, result)
    shown = ", ".join(f"{m} {_fmt(v)}" for m, v in result["metrics"].items())
    log.info("%d videos: %s", len(result["per_video"]), shown or "no metric")
    print(f"evaluated {len(result['per_video'])} videos -> {out_dir / 'metrics.json'}: {shown}", flush=True)
    return out_dir
