"""The learning check: train a tiny preset on the synthetic world on CPU for a fixed wall budget, then score every
saved checkpoint's samples with the oracle metrics (mouth sync against its shifted-audio control, hands, identity,
flicker) on the validation clips. ``experiment=learning_check`` is the EchoMimicV2 family,
``experiment=learning_check_mirrorme`` the MirrorMe family.

    python benchmarks/learning_check.py [--experiment NAME] [extra Hydra overrides]   # make learning-check(-mirrorme)
    python benchmarks/learning_check.py --evaluate logs/<experiment>/<run>   # score an existing run again

Training runs the real entry point (``python -m halfbody.train experiment=learning_check``); scoring rebuilds the
model and datamodule from the run's saved Hydra config and loads each checkpoint with ``weights_only=True``.
It prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ["mouth_sync", "mouth_sync_control", "mouth_sync_margin", "hand_error", "identity_distance", "flicker"]


@torch.no_grad()
def evaluate(run_dir: Path, guidance_scales: tuple[float, ...] = (1.0, 2.5), steps: int | None = None
             ) -> list[dict[str, float]]:
    """Oracle metrics of each checkpoint in ``run_dir/checkpoints`` on the run's validation clips, sampled with
    ``steps`` sampler steps (default: 25 for the DDIM family, the model's configured steps otherwise) at each
    classifier-free guidance scale."""
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
    batches = list(dm.val_dataloader())
    model = hydra.utils.instantiate(cfg.model)
    if steps is None:
        steps = 25 if "echomimic" in cfg.model._target_ else int(cfg.model.num_inference_steps)
    rows = []
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.ckpt")) + [run_dir / "checkpoints" / "last.ckpt"]
    seen = set()
    for ckpt in ckpts:
        if not ckpt.is_file():
            continue
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["global_step"] in seen:  # last.ckpt duplicates the final periodic checkpoint
            continue
        seen.add(state["global_step"])
        model.load_state_dict(state["state_dict"])
        model.eval()
        for scale in guidance_scales:
            per_clip = []
            for i, batch in enumerate(batches):
                video = model.generate(batch, num_inference_steps=steps, guidance_scale=scale,
                                       generator=torch.Generator().manual_seed(i))
                for j in range(video.shape[0]):
                    per_clip.append(oracle_metrics(video[j], batch["ref"][j], batch["kpts"][j], batch["audio"][j],
                                                   float(batch["fps"][j])))
            row = {"step": state["global_step"], "cfg": scale, "clips": len(per_clip)}
            row.update({k: float(np.nanmean([m[k] for m in per_clip])) for k in ORACLE_METRICS})
            rows.append(row)
            print(f"step {row['step']} cfg {scale}: " + ", ".join(f"{k} {row[k]:.3f}" for k in SHOWN), flush=True)
    return rows


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| step | CFG | " + " | ".join(SHOWN) + " |", "|---:|---:|" + "---:|" * len(SHOWN)]
    lines += [f"| {r['step']} | {r['cfg']} | " + " | ".join(f"{r[k]:.3f}" for k in SHOWN) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
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
    print(f"\nrun dir: {run_dir}\n\n{table(rows)}")
    margin = max(r["mouth_sync_margin"] for r in rows if r["step"] == rows[-1]["step"])
    print(f"\nfinal mouth-sync margin over the shifted-audio control: {margin:.3f} "
          f"(target >= 0.5: {'met' if margin >= 0.5 else 'not met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
