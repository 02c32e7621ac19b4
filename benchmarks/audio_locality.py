"""Where does audio act? Generate each validation clip twice, with its own audio and with another clip's audio
(same noise, same reference and pose), and compare the pixel change inside the lips region with the change outside
it, for each audio region (EchoMimicV2 §3.2.2: Lips Partial Attention should leave the non-mouth region alone).

    python benchmarks/audio_locality.py logs/<task>/runs/<run>       # a run dir with .hydra/config.yaml + last.ckpt

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

import halfbody.utils.hydra  # noqa: F401  (registers the hb_root resolver)
from halfbody.data.dataset import AUDIO_FIELDS


@torch.no_grad()
def main(run_dir: Path, regions=("lips", "head", "global"), steps: int = 10) -> None:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.data.num_workers = 0
        cfg.data.condition.pose_groups = "no_lips"  # the lips phase's pose condition
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    model = hydra.utils.instantiate(cfg.model)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.eval()
    print(f"run: {run_dir} (step {state['global_step']}), {sum(b['video'].shape[0] for b in batches)} clips, "
          f"{steps} DDIM steps, CFG 1\n")
    print("| audio region | mean abs change inside lips mask | outside | inside / outside |")
    print("|---|---:|---:|---:|")
    for region in regions:
        model.audio_region = region
        inside, outside = [], []
        for i, batch in enumerate(batches):
            donor = batches[(i + 1) % len(batches)]  # its audio: the window and the context the encoder hears
            other = dict(batch, **{k: donor[k] for k in AUDIO_FIELDS if k in donor})
            a = model.generate(batch, num_inference_steps=steps, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(i))
            b = model.generate(other, num_inference_steps=steps, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(i))
            diff = (a - b).abs().mean(dim=2, keepdim=True)  # (B, F, 1, H, W)
            mask = batch["mask_lips"] > 0.5
            if mask.any():
                inside.append(float(diff[mask].mean()))
                outside.append(float(diff[~mask].mean()))
        i_, o_ = float(np.mean(inside)), float(np.mean(outside))
        print(f"| {region} | {i_:.2e} | {o_:.2e} | {i_ / max(o_, 1e-12):.1f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
