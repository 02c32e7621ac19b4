"""Generation speed of the MirrorMe DiT family: frames per second of ``MirrorMeModule.generate`` (audio features,
reference encoding, Euler sampling with CFG as one batch of 2, VAE decode), random weights.

    python benchmarks/dit_generation_fps.py --size tiny                   # CPU: the tiny preset (model=mirrorme_tiny)
    python benchmarks/dit_generation_fps.py --size paper --device cuda --dtype bf16   # 121x768x512, LTX-Video 2B shapes

``--size paper`` builds the paper-scale classes with their default (LTX-Video 2B / wav2vec2-base) configs and random
weights: the network widths come from conf/model/network/mirrorme_ltx_2b.yaml, steps and CFG from
conf/model/mirrorme.yaml (15 steps, CFG 2.5; MirrorMe §4.1). MirrorMe reports 24.33 FPS at 512x768 (Table 2).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, device: str, dtype: torch.dtype):
    """The MirrorMe module of ``size`` (tiny: the Hydra preset; paper: the 2B classes with random weights)."""
    import hydra
    from hydra import compose, initialize_config_dir

    from halfbody.utils.hydra import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=mirrorme_tiny" if size == "tiny" else "model=mirrorme"])
    if size == "tiny":
        model = hydra.utils.instantiate(cfg.model)
    else:
        from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
        from omegaconf import OmegaConf
        from transformers import Wav2Vec2Config

        from halfbody.mirrorme.module import MirrorMeModule
        from halfbody.mirrorme.transformer import MirrorMeTransformer
        from halfbody.models.audio_encoders import Wav2Vec2AudioEncoder
        from halfbody.models.autoencoders import LTXVideoAutoencoder
        from halfbody.models.flow_matching import RectifiedFlow

        net_cfg = OmegaConf.to_container(cfg.model.network, resolve=False)
        net_kwargs = {k: v for k, v in net_cfg.items() if k not in ("_target_", "_partial_", "transformer_dir", "key_prefix")}
        ae = LTXVideoAutoencoder(None, vae=AutoencoderKLLTXVideo())  # LTX-Video's default config, random weights
        audio = Wav2Vec2AudioEncoder(random_config=Wav2Vec2Config().to_dict(), window=int(cfg.model.audio_encoder.window))

        def network(**kw):
            return MirrorMeTransformer(LTXVideoTransformer3DModel(), kw["audio_feature_dim"],
                                       spatial_factor=kw["spatial_factor"], temporal_factor=kw["temporal_factor"],
                                       **net_kwargs)

        model = MirrorMeModule(network, ae, audio, optimizer=torch.optim.Adam,
                               flow=RectifiedFlow(shift=float(cfg.model.flow.shift)),
                               num_inference_steps=int(cfg.model.num_inference_steps),
                               guidance_scale=float(cfg.model.guidance_scale))
    return model.to(device=device, dtype=dtype).eval(), cfg


def batch_for(model, frames: int, height: int, width: int, device: str, dtype: torch.dtype) -> dict:
    b = 1
    mask = torch.zeros(b, frames, 1, height, width, device=device, dtype=dtype)
    mask[..., height // 8: height // 3, width // 3: 2 * width // 3] = 1  # a face box for the static face mask
    return {
        "video": torch.zeros(b, frames, 3, height, width, device=device, dtype=dtype),
        "ref": torch.rand(b, 3, height, width, device=device, dtype=dtype) * 2 - 1,
        "audio": torch.randn(b, round(frames / 25.0 * 16000), device=device, dtype=dtype) * 0.1,
        "pose": torch.rand(b, frames, 3, height, width, device=device, dtype=dtype),
        "mask_face": mask, "fps": torch.tensor([25.0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--frames", type=int, default=None, help="clip length, 1 + 8k (default: tiny 17, paper 121)")
    ap.add_argument("--height", type=int, default=None, help="default: tiny 64, paper 768")
    ap.add_argument("--width", type=int, default=None, help="default: tiny 64, paper 512")
    ap.add_argument("--steps", type=int, default=None, help="default: the model config's (15)")
    ap.add_argument("--cfg", type=float, default=None, help="default: the model config's (2.5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paper = args.size == "paper"
    frames = args.frames or (121 if paper else 17)
    height, width = args.height or (768 if paper else 64), args.width or (512 if paper else 64)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model, cfg = build(args.size, args.device, dtype)
    steps, scale = args.steps or model.hparams.num_inference_steps, args.cfg if args.cfg is not None else model.hparams.guidance_scale
    batch = batch_for(model, frames, height, width, args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        model.generate(batch, num_inference_steps=steps, guidance_scale=scale)  # warm-up
        sync()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            video = model.generate(batch, num_inference_steps=steps, guidance_scale=scale)
            sync()
            times.append(time.perf_counter() - start)
    assert video.shape[1] == frames
    best = min(times)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.network.parameters()) / 1e6
    print(f"| {date.today()} | {device} | {args.size} ({params:.1f} M params) | {frames}x{height}x{width} | {steps} | "
          f"{scale} | {args.dtype} | {best:.2f} s | {frames / best:.2f} |")
    print(f"times: {', '.join(f'{t:.2f}' for t in times)} s")


if __name__ == "__main__":
    main()
