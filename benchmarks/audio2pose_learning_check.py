"""The audio-to-pose learning check (make learning-check-audio2pose): train the tiny audio2pose model on the gesture
world (``data=synthetic_world_gestures``) on CPU for a wall budget, then score the last checkpoint on the validation
clips with the gesture metrics (``halfbody.metrics.gestures``):

- beat alignment of the sampled hands against their own audio, against two shuffled-audio controls (the same
  motion scored against another clip's audio onsets; motion sampled from another clip's audio, scored against
  this clip's), and the ground truth's;
- hand-motion diversity against the static-pose baseline (the reference pose held: 0) and the ground truth's,
  and between two samples for the same audio.

    python benchmarks/audio2pose_learning_check.py [extra Hydra overrides]      # make learning-check-audio2pose
    python benchmarks/audio2pose_learning_check.py --evaluate logs/audio2pose_learning_check/runs/<run>

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def evaluate(run_dir: Path, guidance_scales: tuple[float, ...] = (1.0, 2.0)) -> list[dict]:
    import hydra
    from omegaconf import OmegaConf, open_dict

    import halfbody.utils.hydra  # noqa: F401  (registers the hb_root resolver)
    from halfbody.metrics.gestures import beat_alignment, audio_onsets, gesture_metrics, motion_beats, diversity

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.data.num_workers = 0
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    model = hydra.utils.instantiate(cfg.model)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"], strict=False)
    model.eval()
    rows = []
    for scale in guidance_scales:
        gen, gen2, shuffled, tgt, audio = [], [], [], [], []
        for i, batch in enumerate(batches):
            g = torch.Generator().manual_seed(i)
            gen.append(model.sample_keypoints(batch, generator=g, guidance_scale=scale))
            gen2.append(model.sample_keypoints(batch, generator=torch.Generator().manual_seed(100 + i),
                                               guidance_scale=scale))
            rolled = dict(batch)  # the shuffled-audio control: each clip's motion sampled from the next clip's audio
            n = batch["kpts"].shape[1]
            feats = model.audio_features(batch, n).float().roll(1, dims=0)
            rolled_kpts = model.pipeline(feats, batch["kpts"][:, 0].float(), n, guidance_scale=scale,
                                         generator=torch.Generator().manual_seed(i))
            shuffled.append(rolled_kpts)
            tgt.append(batch["kpts"])
            audio.append(batch["audio"])
        gen, gen2, shuffled, tgt, audio = map(torch.cat, (gen, gen2, shuffled, tgt, audio))
        fps = float(cfg.data.fps)
        m = gesture_metrics(gen, tgt, audio, fps, second_sample=gen2)
        ba_shuffled = [beat_alignment(motion_beats(shuffled[j].numpy(), fps, visible=tgt[j, 0, :, 2].numpy()),
                                      audio_onsets(audio[j].numpy())) for j in range(len(tgt))]
        m["beat_alignment_shuffled_audio"] = float(np.nanmean(ba_shuffled))
        static = tgt[:, :1].expand_as(tgt)  # the static-pose baseline: the reference pose held
        m["static_diversity"] = float(np.mean([diversity(static[j].numpy(), tgt[j, 0, :, 2].numpy())
                                               for j in range(len(tgt))]))
        m.update(step=int(ckpt["global_step"]), guidance_scale=scale, clips=int(len(tgt)))
        rows.append(m)
    return rows


SHOWN = ["step", "guidance_scale", "clips", "beat_alignment", "beat_alignment_mismatched",
         "beat_alignment_shuffled_audio", "gt_beat_alignment", "diversity", "static_diversity", "gt_diversity",
         "sample_diversity", "fd_pose", "fd_kinematic", "jitter", "gt_jitter"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in SHOWN) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if argv[:1] == ["--evaluate"]:
        print(table(evaluate(Path(argv[1]))))
        return
    out = ROOT / "logs" / "audio2pose_learning_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    # one intra-op thread per process: the model's ops are tiny, and on a shared CPU two threads spend their time in
    # barriers (a training step measured 15x slower with 2 threads at load 14 on 2 cores)
    env = {"OMP_NUM_THREADS": "1", **os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "halfbody.train", "experiment=audio2pose_learning_check",
                    f"hydra.run.dir={out}", *argv], cwd=ROOT, env=env, check=True)
    print(f"trained in {time.perf_counter() - t0:.0f} s: {out}")
    print(table(evaluate(out)))


if __name__ == "__main__":
    main(sys.argv[1:])
