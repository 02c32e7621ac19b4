"""Evaluation entry point: ``python -m halfbody.evaluate generated=out/ ground_truth=gt/`` (or ``list=test_list.txt
generated=out/``).

It only composes and runs (the lightning-hydra-template ``eval.py`` pattern): the metrics live in
:mod:`halfbody.metrics` (:func:`halfbody.metrics.evaluation.run_evaluation`). Settings and the pinned protocol:
``conf/evaluate.yaml``; definitions: ``docs/EVALUATION.md``.

- **Inputs.** ``generated`` and ``ground_truth``: two folders of videos matched by file stem; or ``list``: a
  ``python -m halfbody.generate`` batch list (``image audio [pose|-] [ground-truth video|-]``) with
  ``generated=<that run's output_dir>``, whose outputs are named as generate names them; the list's reference image
  (CSIM), audio (Sync) and ground truth (FID, FVD, SSIM, PSNR, LPIPS) are used.
- **Output.** ``<output_dir>/metrics.json`` (metrics, per-video values, skipped metrics with their reasons, the
  protocol, the inputs), ``metrics.md`` (a markdown table), and a W&B table when a wandb logger is configured.

:func:`evaluate` is the Python API (``halfbody.ablate`` calls it): ``evaluate(cfg) -> {"metrics", "skipped",
"per_video", "protocol"}``. A bad input ends in one line, ``error: <key>=<value>: <problem>``, and exit code 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


# ================================================================================================ inputs
def _dir(value: Any, key: str) -> Path:
    p = Path(os.path.expanduser(str(value)))
    if not p.exists():
        raise UserError(f"{key}={str(value)!r} does not exist")
    if not p.is_dir():
        raise UserError(f"{key}={str(value)!r} is not a directory (expected a folder of videos)")
    return p


def _videos(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES and not f.name.startswith("."):
            out.setdefault(f.stem, f)
    return out


def collect_pairs(cfg: DictConfig):
    """``(pairs, problems, inputs)``: the videos to score, one-line notes on what was left out, and the inputs."""
    from halfbody.metrics.evaluation import VideoPair

    if not cfg.get("generated"):
        raise UserError("generated is not set: give generated=<folder of generated videos> and ground_truth=<folder> "
                        "(matched by file stem), or list=<generate batch list> generated=<its output_dir>")
    gen_dir = _dir(cfg.generated, "generated")
    generated = _videos(gen_dir)
    problems: list[str] = []
    pairs = []
    inputs: dict[str, Any] = {"generated": str(gen_dir)}
    if cfg.get("list"):
        from halfbody.generation.jobs import Job, _row_jobs

        rows, list_path = _row_jobs(str(cfg.list), gen_dir)
        inputs["list"] = str(list_path)
        for job in rows:
            if not isinstance(job, Job):
                problems.append(job)
                continue
            if not job.output.is_file():
                problems.append(f"{job.where}: {job.output.name} is not in generated={str(gen_dir)!r} (not generated)")
                continue
            gt = Path(job.gt_video) if job.gt_video else None
            if gt is not None and not gt.is_file():
                problems.append(f"{job.where}: ground-truth video {str(gt)!r} does not exist (scored without it)")
                gt = None
            pairs.append(VideoPair(name=job.output.stem, generated=job.output, ground_truth=gt,
                                   reference=Path(job.ref) if job.ref else None,
                                   audio=Path(job.audio) if job.audio else None,
                                   pose=Path(job.pose) if job.pose and job.pose.endswith(".npy") else None))
        if cfg.get("ground_truth"):
            problems.append("ground_truth is ignored with list= (the list's 4th column names each ground truth)")
    else:
        if not cfg.get("ground_truth"):
            raise UserError("ground_truth is not set: give ground_truth=<folder of real videos> (matched to "
                            "generated= by file stem), or list=<generate batch list>")
        gt_dir = _dir(cfg.ground_truth, "ground_truth")
        inputs["ground_truth"] = str(gt_dir)
        real = _videos(gt_dir)
        for stem in sorted(set(generated) | set(real)):
            if stem not in real:
                problems.append(f"{generated[stem].name}: no ground truth {stem}.* in ground_truth={str(gt_dir)!r}")
            elif stem not in generated:
                problems.append(f"{real[stem].name}: no generated {stem}.* in generated={str(gen_dir)!r}")
            else:
                pairs.append(VideoPair(name=stem, generated=generated[stem], ground_truth=real[stem]))
    if not pairs:
        where = f"list={str(cfg.list)!r}" if cfg.get("list") else f"generated={str(cfg.generated)!r}"
        detail = f" ({problems[0]}{' ...' if len(problems) > 1 else ''})" if problems else ""
        raise UserError(f"{where}: no video to evaluate{detail}")
    inputs["videos"] = len(pairs)
    return pairs, problems, inputs


def _device(cfg: DictConfig) -> torch.device:
    value = str(cfg.get("device", "auto"))
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise UserError(f"device={value!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={value!r}: CUDA is not available on this machine")
    return dev


def check_protocol(cfg: DictConfig) -> None:
    """Start-up checks of the protocol values (one line naming the key)."""
    p = cfg.protocol
    for key, minimum in (("resolution", 32), ("fid_resize", 75), ("fvd_resize", 32), ("fvd_clip_frames", 1),
                         ("ssim_kernel", 3), ("sync_vshift", 1)):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise UserError(f"protocol.{key}={v!r}: expected an integer >= {minimum}")
    if p.get("fps") is not None and (isinstance(p.fps, bool) or not isinstance(p.fps, (int, float)) or p.fps <= 0):
        raise UserError(f"protocol.fps={p.fps!r}: expected a frame rate > 0 (or null: as stored)")
    nf = p.get("num_frames")
    if nf is not None and (isinstance(nf, bool) or not isinstance(nf, int) or nf < 1):
        raise UserError(f"protocol.num_frames={nf!r}: expected an integer >= 1 (or null: all frames)")
    if p.get("synthetic", "auto") not in ("auto", True, False):
        raise UserError(f"protocol.synthetic={p.synthetic!r}: expected auto, true or false")
    box = list(p.get("face_fallback_box") or [])
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise UserError(f"protocol.face_fallback_box={box!r}: expected [x0, y0, x1, y1] in [0, 1], x0 < x1, y0 < y1")


# ================================================================================================ outputs
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
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


def _log_wandb(cfg: DictConfig, result: dict[str, Any]) -> None:
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the videos ``cfg`` names; writes ``metrics.json`` and ``metrics.md`` in ``cfg.output_dir``.

    Returns ``{"metrics": {name: float}, "skipped": {name: reason}, "per_video": {stem: {...}}, "protocol": {...}}``
    (the JSON holds these plus ``inputs``, ``problems`` and the time). Raises ``UserError`` for bad inputs.
    """
    from halfbody.metrics.evaluation import run_evaluation
    from halfbody.utils.io import atomic_output

    check_protocol(cfg)
    pairs, problems, inputs = collect_pairs(cfg)
    device = _device(cfg)
    for line in problems:
        log.warning(line)
    result = run_evaluation(pairs, cfg, device)
    out_dir = Path(os.path.expanduser(str(cfg.get("output_dir") or cfg.paths.output_dir)))
    record = {**result, "inputs": inputs, "problems": problems, "device": str(device),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "metrics_config": OmegaConf.to_container(cfg.metrics, resolve=True)}
    with atomic_output(out_dir / "metrics.json") as tmp:  # strict JSON: nan / inf are written as null
        tmp.write_text(json.dumps(_finite(record), indent=2, allow_nan=False, default=str))
    with atomic_output(out_dir / "metrics.md") as tmp:
        tmp.write_text(markdown_table(result))
    _log_wandb(cfg, result)
    shown = ", ".join(f"{m} {_fmt(v)}" for m, v in result["metrics"].items())
    log.info("%d videos: %s", len(result["per_video"]), shown or "no metric")
    print(f"evaluated {len(result['per_video'])} videos -> {out_dir / 'metrics.json'}: {shown}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
