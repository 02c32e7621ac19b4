"""The learning check: train a tiny preset on the synthetic world on CPU for a fixed wall budget, then score every
saved checkpoint's samples with the oracle metrics (mouth sync against its shifted-audio control, hands, identity,
flicker) on the validation clips. ``experiment=learning_check`` is the EchoMimicV2 family,
``experiment=learning_check_mirrorme`` the MirrorMe family.

    python benchmarks/learning_check.py [--experiment NAME] [extra Hydra overrides]   # make learning-check(-mirrorme)
    python benchmarks/learning_check.py --evaluate logs/<experiment>/<run>   # score an existing run again
    python benchmarks/learning_check.py --plot OUT.png RUN [RUN ...]        # margin vs minutes of several runs

Training runs the real entry point (``python -m halfbody.train experiment=learning_check``); scoring rebuilds the
model and datamodule from the run's saved Hydra config and loads each checkpoint with ``weights_only=True`` (the
checkpoints hold the EMA weights when the run had ``callbacks.ema``). Each checkpoint is sampled with every
validation clip's own audio, and the last one also with *another clip's audio* (the batch's audio rolled by one
clip, scored against the clip's own audio): audio that drives the mouth loses its margin there (issue 11).
It prints a Markdown table for benchmarks/RESULTS.md, writes the rows to ``<run>/learning_check.json`` and plots
the margin against training minutes into ``<run>/learning_check.png``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import json

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ["mouth_sync", "mouth_sync_control", "mouth_sync_margin", "hand_error", "identity_distance", "flicker"]


AUDIO_KEYS = ("audio", "audio_context", "audio_context_offset", "audio_context_length", "audio_feats")


def other_clip_audio(batch: dict) -> dict:
    """The batch with each clip's audio (and audio context / features) replaced by the next clip's (rolled by one);
    video, reference, pose and keypoints stay. Scored against ``batch["audio"]``, a mouth driven by the audio loses
    its sync."""
    out = dict(batch)
    for k in AUDIO_KEYS:
        if k in batch and torch.is_tensor(batch[k]) and batch[k].ndim:
            out[k] = batch[k].roll(1, dims=0)
    return out


def _minutes(run_dir: Path, ckpt: Path) -> float:
    """Training minutes at a checkpoint: its file time after the run's config was written (the run's start)."""
    start = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    return max(0.0, (ckpt.stat().st_mtime - start) / 60.0)


@torch.no_grad()
def evaluate(run_dir: Path, guidance_scales: tuple[float, ...] = (1.0, 2.5), steps: int | None = None,
             max_batches: int | None = None, other_audio: bool = True) -> list[dict[str, float]]:
    """Oracle metrics of each checkpoint in ``run_dir/checkpoints`` on the run's validation clips, sampled with
    ``steps`` sampler steps (default: 25 for the DDIM family, the model's configured steps otherwise) at each
    classifier-free guidance scale. With ``other_audio``, the last checkpoint is also sampled with another clip's
    audio (rows with ``audio = "other clip"``)."""
    import hydra
    from omegaconf import OmegaConf, open_dict

    import halfbody.utils.hydra  # noqa: F401  (registers the hb_root resolver)
    from halfbody.metrics.oracle import ORACLE_METRICS, oracle_metrics

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.data.num_workers = 0
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batches = list(dm.val_dataloader())[:max_batches]
    model = hydra.utils.instantiate(cfg.model)
    if steps is None:
        steps = 25 if "echomimic" in cfg.model._target_ else int(cfg.model.num_inference_steps)
    rows = []
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.ckpt")) + [run_dir / "checkpoints" / "last.ckpt"]
    found = []
    seen = set()
    for ckpt in ckpts:
        if not ckpt.is_file():
            continue
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["global_step"] in seen:  # last.ckpt duplicates the final periodic checkpoint
            continue
        seen.add(state["global_step"])
        found.append((ckpt, state))
    found.sort(key=lambda cs: cs[1]["global_step"])
    for n, (ckpt, state) in enumerate(found):
        model.load_state_dict(state["state_dict"])
        model.eval()
        audios = ["own", "other clip"] if other_audio and n == len(found) - 1 and len(batches) else ["own"]
        for audio in audios:
            for scale in guidance_scales:
                per_clip = []
                for i, batch in enumerate(batches):
                    driving = batch if audio == "own" else other_clip_audio(batch)
                    video = model.generate(driving, num_inference_steps=steps, guidance_scale=scale,
                                           generator=torch.Generator().manual_seed(i))
                    for j in range(video.shape[0]):  # always scored against the clip's own audio
                        per_clip.append(oracle_metrics(video[j], batch["ref"][j], batch["kpts"][j],
                                                       batch["audio"][j], float(batch["fps"][j])))
                row = {"step": state["global_step"], "minutes": round(_minutes(run_dir, ckpt), 2), "cfg": scale,
                       "audio": audio, "clips": len(per_clip)}
                row.update({k: float(np.nanmean([m[k] for m in per_clip])) for k in ORACLE_METRICS})
                rows.append(row)
                print(f"step {row['step']} ({row['minutes']:.1f} min) cfg {scale} audio {audio}: "
                      + ", ".join(f"{k} {row[k]:.3f}" for k in SHOWN), flush=True)
    return rows


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| step | minutes | CFG | audio | " + " | ".join(SHOWN) + " |", "|---:|---:|---:|---|" + "---:|" * len(SHOWN)]
    lines += [f"| {r['step']} | {r.get('minutes', float('nan')):.1f} | {r['cfg']} | {r.get('audio', 'own')} | "
              + " | ".join(f"{r[k]:.3f}" for k in SHOWN) + " |" for r in rows]
    return "\n".join(lines)


def plot(series: dict[str, list[dict[str, float]]], out: Path, size: tuple[int, int] = (820, 420)) -> Path:
    """A PNG of the mouth-sync margin (own audio) against training minutes, one line per (run, CFG scale), with the
    target (0.5) and zero as dashed lines. ``series``: label -> rows of :func:`evaluate`."""
    from PIL import Image, ImageDraw

    from halfbody.utils.io import atomic_output

    w, h = size
    left, right, top, bottom = 60, 290, 20, 45
    lines = {}
    for label, rows in series.items():
        for r in rows:
            if r.get("audio", "own") == "own" and np.isfinite(r["mouth_sync_margin"]):
                lines.setdefault(f"{label} CFG {r['cfg']:g}", []).append((r.get("minutes", 0.0), r["mouth_sync_margin"]))
    xmax = max([x for pts in lines.values() for x, _ in pts] + [1.0])
    ys = [y for pts in lines.values() for _, y in pts] + [0.0, 0.6]
    ymin, ymax = min(-0.2, min(ys)), max(ys)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (w - left - right) * x / xmax, top + (h - top - bottom) * (ymax - y) / (ymax - ymin))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for y, colour in ((0.5, (0, 150, 0)), (0.0, (150, 150, 150))):
        x0, yy = px(0, y)
        x1, _ = px(xmax, y)
        for xs in range(int(x0), int(x1), 8):
            d.line([(xs, yy), (min(xs + 4, x1), yy)], fill=colour)
        d.text((left - 35, yy - 6), f"{y:.1f}", fill=colour)
    for i in range(5):
        x = xmax * i / 4
        d.text((px(x, ymin)[0] - 8, h - bottom + 5), f"{x:.0f}", fill="black")
    d.text((left + (w - left - right) // 2 - 60, h - 20), "training minutes", fill="black")
    d.text((5, top), "margin", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (214, 39, 40), (148, 103, 189), (44, 160, 44), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for n, (name, pts) in enumerate(sorted(lines.items())):
        pts = sorted(pts)
        colour = palette[n % len(palette)]
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((w - right + 10, top + 16 * n), name, fill=colour)
    with atomic_output(out) as tmp:
        img.save(tmp, format="PNG")
    return out


def save_rows(run_dir: Path, rows: list[dict[str, float]]) -> Path:
    from halfbody.utils.io import atomic_output

    out = run_dir / "learning_check.json"
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--plot"]:
        out, runs = Path(argv[1]), [Path(r) for r in argv[2:]]
        # legend: experiment and the run's start time (run directories are named %Y-%m-%d_%H-%M-%S)
        series = {f"{r.parent.name} {r.name[11:16]}": json.loads((r / "learning_check.json").read_text()) for r in runs}
        print(f"plot: {plot(series, out)}")
        return 0
    if argv[:1] == ["--evaluate"]:
        run_dir = Path(argv[1])
    else:
        experiment = "learning_check"
        if argv[:1] == ["--experiment"]:
            experiment, argv = argv[1], argv[2:]
        run_dir = ROOT / "logs" / experiment / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        cmd = [sys.executable, "-m", "halfbody.train", f"experiment={experiment}", f"hydra.run.dir={run_dir}", *argv]
        print("$", " ".join(cmd), flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"training wall time: {(time.time() - start) / 60:.1f} min", flush=True)
        if proc.returncode != 0:
            print(f"training failed with exit code {proc.returncode}", file=sys.stderr)
            return proc.returncode
    rows = evaluate(run_dir)
    if not rows:
        print(f"no checkpoints in {run_dir}/checkpoints", file=sys.stderr)
        return 1
    save_rows(run_dir, rows)
    png = plot({run_dir.parent.name: rows}, run_dir / "learning_check.png")
    print(f"\nrun dir: {run_dir}\nplot: {png}\n\n{table(rows)}")
    last = [r for r in rows if r["step"] == rows[-1]["step"]]
    other = [r["mouth_sync_margin"] for r in last if r.get("audio") == "other clip"]
    if other:
        print(f"other clip's audio (same checkpoint): margin {max(other):.3f} (should lose the margin)")
    margin = max(r["mouth_sync_margin"] for r in last if r.get("audio", "own") == "own")
    print(f"\nfinal mouth-sync margin over the shifted-audio control: {margin:.3f} "
          f"(target >= 0.5: {'met' if margin >= 0.5 else 'not met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
