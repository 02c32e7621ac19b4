"""The audio-to-pose learning check (make learning-check-audio2pose): train the tiny audio2pose model on the gesture
world (``data=synthetic_world_gestures``) on CPU for a wall budget, then score the last checkpoint on the validation
clips with the gesture metrics (``halfbody.metrics.gestures``):

- beat alignment of the sampled hands against their own audio, against two shuffled-audio controls (the same
  motion scored against another clip's audio onsets; motion sampled from another clip's audio, scored against
  this clip's), and the ground truth's; averaged over 4 samples per clip, with standard errors;
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
def evaluate(run_dir: Path, guidance_scales: tuple[float, ...] = (1.0, 2.0), seeds: int = 4) -> list[dict]:
    """Gesture metrics of ``run_dir``'s last checkpoint on its validation clips. Beat alignment and its two controls
    are averaged over ``seeds`` samples per clip (``*_sem``: standard error over clips x seeds); the other metrics
    use the first sample."""
    import hydra
    from omegaconf import OmegaConf, open_dict

    import halfbody.utils.hydra  # noqa: F401  (registers the hb_root resolver)
    from halfbody.metrics.gestures import audio_onsets, beat_alignment, diversity, gesture_metrics, motion_beats

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
    fps = float(cfg.data.fps)
    tgt = torch.cat([b["kpts"] for b in batches])
    audio = torch.cat([b["audio"] for b in batches])
    onsets = [audio_onsets(a.numpy()) for a in audio]
    vis = [t[0, :, 2].numpy() for t in tgt]
    n = len(tgt)

    def ba(kpts, against):  # per clip: motion of clip j against the onsets of clip against[j]
        return [beat_alignment(motion_beats(kpts[j].numpy(), fps, visible=vis[j]), onsets[against[j]])
                for j in range(n)]

    rows = []
    for scale in guidance_scales:
        own, mismatched, shuffled, first, second = [], [], [], None, None
        for seed in range(seeds):
            gen, rolled = [], []
            for i, batch in enumerate(batches):
                g = torch.Generator().manual_seed(1000 * seed + i)
                gen.append(model.sample_keypoints(batch, generator=g, guidance_scale=scale))
                k = batch["kpts"].shape[1]  # the shuffled-audio control: motion sampled from the next clip's audio
                feats = model.audio_features(batch, k).float().roll(1, dims=0)
                rolled.append(model.pipeline(feats, batch["kpts"][:, 0].float(), k, guidance_scale=scale,
                                             generator=torch.Generator().manual_seed(1000 * seed + i)))
            gen, rolled = torch.cat(gen), torch.cat(rolled)
            first, second = (gen, second) if first is None else (first, gen if second is None else second)
            own += ba(gen, list(range(n)))
            mismatched += ba(gen, [(j + 1) % n for j in range(n)])
            shuffled += ba(rolled, list(range(n)))
        m = gesture_metrics(first, tgt, audio, fps, second_sample=second)
        for name, vals in (("beat_alignment", own), ("beat_alignment_mismatched", mismatched),
                           ("beat_alignment_shuffled_audio", shuffled)):
            v = np.asarray([x for x in vals if np.isfinite(x)])
            m[name], m[name + "_sem"] = float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))
        static = tgt[:, :1].expand_as(tgt)  # the static-pose baseline: the reference pose held
        m["static_diversity"] = float(np.mean([diversity(static[j].numpy(), vis[j]) for j in range(n)]))
        m.update(step=int(ckpt["global_step"]), guidance_scale=scale, clips=n, seeds=seeds)
        rows.append(m)
    return rows


SHOWN = ["step", "guidance_scale", "clips", "seeds", "beat_alignment", "beat_alignment_sem",
         "beat_alignment_mismatched", "beat_alignment_shuffled_audio", "beat_alignment_shuffled_audio_sem",
         "gt_beat_alignment", "diversity", "static_diversity", "gt_diversity",
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
