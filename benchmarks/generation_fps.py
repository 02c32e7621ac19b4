"""Generation speed of both families: frames per second of what ``python -m halfbody.generate`` runs per video
(``model.generate_video``: audio features, reference encoding, the family's pipeline with CFG, VAE decode), random
weights.

    python benchmarks/generation_fps.py                      # CPU: both tiny presets (make bench-generate)
    python benchmarks/generation_fps.py --size paper --dtype bf16 --device cuda          # paper shapes on a GPU
    python benchmarks/generation_fps.py --family mirrorme --size paper --dtype bf16      # one family

Variants (each family's paper settings):

- ``echomimic_v2/release``: 30 DDIM steps, CFG 2.5, 12-frame context windows overlapping by 3 (EchoMimicV2 §4.1, the
  release's ``infer.py``); ``echomimic_v2/release_acc``: the accelerated release, 6 steps, CFG 1.0
  (``model/sampler=release_acc``). Paper size: 768 x 768, SD1.5-shaped UNets (ReferenceNet + denoiser with
  temporal modules), sd-vae-ft-mse-shaped VAE, the release's whisper-tiny features.
- ``mirrorme``: 15 Euler steps, CFG 2.5 (MirrorMe §4.1) on one 121 x 768 x 512 clip (paper size: LTX-Video 2B
  transformer and VAE shapes, wav2vec2-base). MirrorMe reports 24.33 FPS at 512 x 768 (Table 2).

Tiny sizes are the CPU presets (``model=<family>_tiny``) at their 64 x 64 clips. ``--dtype bf16`` runs bf16 autocast
with fp32 weights, as ``generate precision=bf16-mixed`` does (the audio encoder stays fp32). Each row: a warm-up run
with one step, then ``--repeats`` timed runs (the best is reported). Paper sizes build random weights at the paper
shapes (nothing is downloaded; the VAE goes through a temporary directory in its diffusers layout).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: per family: (variant label, config overrides); steps and CFG come from the variant's model config
VARIANTS = {
    "echomimic_v2": [("release", ["model/sampler=release"]), ("release_acc", ["model/sampler=release_acc"])],
    "mirrorme": [("euler", [])],
}
#: SD1.5 / sd-image-variations UNet (diffusers UNet2DConditionModel config; cross-attention width 768)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    norm_num_groups=32,
)
#: sd-vae-ft-mse (diffusers AutoencoderKL config)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
#: whisper-tiny's encoder (transformers WhisperConfig); the decoder is dropped by the audio encoder
WHISPER_TINY = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, decoder_layers=1,
                    decoder_attention_heads=6, decoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500,
                    max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    decoder_start_token_id=1)


def compose(family: str, size: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from halfbody.utils.hydra import CONFIG_DIR

    preset = f"model={family}_tiny" if size == "tiny" else f"model={family}"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"family={family}", preset, *overrides])


def build(family: str, size: str, overrides: list[str], tmp: Path):
    """The family's LightningModule with random weights (tiny: the CPU preset; paper: the paper shapes)."""
    import hydra
    from omegaconf import open_dict

    cfg = compose(family, size, overrides)
    torch.manual_seed(0)
    if size == "tiny":
        return hydra.utils.instantiate(cfg.model), cfg
    if family == "mirrorme":
        return build_mirrorme_paper(cfg), cfg
    from diffusers import AutoencoderKL

    vae_dir = tmp / "sd-vae-ft-mse"
    if not vae_dir.exists():
        AutoencoderKL(**SD_VAE).save_pretrained(vae_dir)
    from halfbody.echomimic_v2.network import EchoMimicV2Network

    def network(latent_channels: int, **kw):  # the release's network (conf/model/network/echomimic_v2_sd15.yaml)
        assert latent_channels == SD15_UNET["in_channels"], latent_channels
        return EchoMimicV2Network(SD15_UNET, audio_attention="direct", audio_gain=3.0, **kw)

    with open_dict(cfg):
        cfg.model.phd_loss = None
        cfg.model.network = None  # built by `network` above, with random weights
        cfg.model.autoencoder.path = str(vae_dir)
        cfg.model.audio_encoder.path = None
        cfg.model.audio_encoder.random_config = WHISPER_TINY
    return hydra.utils.instantiate(cfg.model, network=network), cfg


def build_mirrorme_paper(cfg):
    """The 2B classes with their default (LTX-Video 2B / wav2vec2-base) configs and random weights; widths from
    conf/model/network/mirrorme_ltx_2b.yaml, steps and CFG from conf/model/mirrorme.yaml."""
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

    return MirrorMeModule(network, ae, audio, optimizer=torch.optim.Adam,
                          flow=RectifiedFlow(shift=float(cfg.model.flow.shift)),
                          num_inference_steps=int(cfg.model.num_inference_steps),
                          guidance_scale=float(cfg.model.guidance_scale))


def conditions(frames: int, height: int, width: int, fps: float, device: str, seed: int = 0) -> dict:
    """What ``halfbody.generation.conditions.condition_tensors`` hands a family: reference, 16 kHz audio, pose maps,
    region masks (a face box, as the static inference face mask needs)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, 1, height, width)
    mask[..., height // 8: height // 3, width // 3: 2 * width // 3] = 1
    mask = mask.to(device).expand(1, frames, 1, height, width)
    return {
        "ref": (torch.rand(1, 3, height, width, generator=g) * 2 - 1).to(device),
        "audio": (torch.randn(1, round(frames / fps * 16000), generator=g) * 0.1).to(device),
        "pose": torch.rand(1, frames, 3, height, width, generator=g).to(device),
        "mask_lips": mask, "mask_head": mask, "mask_face": mask, "fps": torch.tensor([fps]),
    }


def run_variant(model, frames: int, height: int, width: int, fps: float, device: str, bf16: bool,
                repeats: int, steps: int | None = None, scale: float | None = None) -> tuple[list[float], int, float]:
    from halfbody.generation.model import autocast

    steps = int(steps or model.hparams.num_inference_steps)
    scale = float(model.hparams.guidance_scale if scale is None else scale)
    options = {"clip_frames": frames, "motion_latent_frames": 1} if "clip_frames" in model.PIPELINE.LONG_VIDEO_OPTIONS \
        else {}
    cond = conditions(frames, height, width, fps, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with torch.inference_mode(), autocast(model, torch.device(device), bf16):
        for i in range(repeats + 1):  # the first run (one step) warms up kernels and allocators
            g = torch.Generator(device=device).manual_seed(0)
            sync()
            start = time.perf_counter()
            video = model.generate_video(cond, frames, **options, num_inference_steps=1 if i == 0 else steps,
                                         guidance_scale=scale, generator=g)
            sync()
            if i:
                times.append(time.perf_counter() - start)
    assert video.shape[1] == frames, video.shape
    return times, steps, scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["both", *VARIANTS], default="both")
    ap.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--frames", type=int, default=None,
                    help="frames per video (default: EchoMimicV2 36 = 4 context windows; MirrorMe one clip, tiny 17, "
                         "paper 121)")
    ap.add_argument("--height", type=int, default=None, help="default: tiny 64; paper 768")
    ap.add_argument("--width", type=int, default=None, help="default: tiny 64; paper EchoMimicV2 768, MirrorMe 512")
    ap.add_argument("--variants", default=None, help="comma-separated (release, release_acc, euler); default: all")
    ap.add_argument("--steps", type=int, default=None, help="default: each variant's (30, 6, 15)")
    ap.add_argument("--cfg", type=float, default=None, help="default: each variant's (2.5, 1.0, 2.5)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default: tiny 2, paper 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paper = args.size == "paper"
    repeats = args.repeats or (1 if paper else 2)
    families = list(VARIANTS) if args.family == "both" else [args.family]
    wanted = None if not args.variants else set(args.variants.split(","))
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device_name}, commit {commit}")
    print("| family | variant | size (denoiser params) | frames x H x W | steps | CFG | dtype | seconds | frames/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            frames = args.frames or (36 if family == "echomimic_v2" else (121 if paper else 17))
            height = args.height or (768 if paper else 64)
            width = args.width or ((512 if family == "mirrorme" else 768) if paper else 64)
            for variant, overrides in VARIANTS[family]:
                if wanted is not None and variant not in wanted:
                    continue
                model, _ = build(family, args.size, overrides, Path(tmp))
                model = model.to(args.device).eval().requires_grad_(False)
                times, steps, scale = run_variant(model, frames, height, width, 25.0, args.device,
                                                  args.dtype == "bf16", repeats, args.steps, args.cfg)
                params = sum(p.numel() for p in model.network.parameters()) / 1e6
                best = min(times)
                print(f"| {family} | {variant} | {args.size} ({params:.1f} M) | {frames}x{height}x{width} | {steps} | "
                      f"{scale:g} | {args.dtype} | {best:.2f} | {frames / best:.2f} |", flush=True)
                del model
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
