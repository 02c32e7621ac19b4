"""Measured parity with the official EchoMimicV2 code (issue 10 §6).

    python benchmarks/official_parity.py --official /path/to/echomimic_v2      # a checkout of antgroup/echomimic_v2
    make official-parity OFFICIAL=/path/to/echomimic_v2

The official repository is only imported from the given checkout and run here; none of its code is in this project.
At a small configuration (a 4-level UNet of widths 32/32/64/64 in the release's layout, whisper-tiny's shape with
random weights, 64 x 64 pixels, 16 frames) the script

1. draws random weights for the official modules (their ``UNet2DConditionModel`` reference net,
   ``EMOUNet3DConditionModel`` with the release's ``inference_v2.yaml`` kwargs and 384-wide audio attention,
   ``PoseEncoder``) and writes them in the release's file format (``torch.save`` of state dicts:
   ``reference_unet.pth``, ``denoising_unet.pth``, ``motion_module.pth``, ``pose_encoder.pth``, plus an
   ``sd-image-variations-diffusers/unet`` directory and ``audio_processor/tiny.pt`` in OpenAI's format, a random
   ``sd-vae-ft-mse``-shaped VAE);
2. loads them twice: with the official loading code (``infer.py``'s order: ``from_pretrained`` /
   ``from_pretrained_2d`` then ``load_state_dict``; ``load_audio_model``) and with ours
   (:func:`halfbody.echomimic_v2.official.network_from_release`, the ``whisper_tiny_release`` audio encoder, the
   ``sd_vae_ft_mse`` autoencoder class, the presets' scheduler and sampler settings read from ``conf/``);
3. reports the max abs difference (and the official output's max abs value, its scale) of
   (1) the audio features of a wav file, (2) one UNet forward with the reference bank (fp32; also with the
   conditional and unconditional branches in one batch, as the release's CFG runs), (3) a full sampling run
   (``--steps``, default 6) of the official ``EchoMimicV2Pipeline`` vs
   :class:`halfbody.echomimic_v2.pipeline.EchoMimicV2Pipeline` (the standard sampler at CFG 2.5 and the accelerated
   pipeline at CFG 1.0), final latents and decoded frames;
4. repeats (2) and (3) in float64 on both sides: what float32 rounding does not explain shows there.

Shims (inside this script only, nothing in the checkout is modified):

- ``ffmpeg``: the release's ``whisper/audio.py`` decodes audio with ffmpeg-python and the ffmpeg CLI (neither is
  installed here). A stand-in ``ffmpeg`` module returns what ``ffmpeg -i file -f s16le -ac 1 -ar 16000 -`` gives for
  a 16 kHz mono 16-bit PCM wav (its samples unchanged) and refuses any other file.
- ``ReferenceAttentionControl.register_reference_hooks`` puts its CFG mask on ``torch.device("cuda")`` by default;
  the default becomes the CPU.
- Optionally (the rows marked "bank fp32"): ``ReferenceAttentionControl.update``'s default ``dtype=torch.float16``
  becomes float32. The release's pipelines call ``update`` without a dtype, so they round the reference bank to
  float16 even in a float32 run; the rows without the mark run the official code as it is.

Runs on the CPU (``--threads``, default 2): about 2 minutes with 6 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halfbody.utils.errors import UserError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
#: files whose presence makes a directory a checkout of antgroup/echomimic_v2
REQUIRED = (
    "src/models/unet_3d_emo.py",
    "src/models/unet_2d_condition.py",
    "src/models/pose_encoder.py",
    "src/models/mutual_self_attention.py",
    "src/models/whisper/audio2feature.py",
    "src/pipelines/pipeline_echomimicv2.py",
    "src/pipelines/pipeline_echomimicv2_acc.py",
    "configs/inference/inference_v2.yaml",
)
# the small configuration: sd-image-variations' UNet config with small widths (4 levels, as from_pretrained_2d needs)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=8, attention_head_dim=8,
    cross_attention_dim=32, act_fn="silu", center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, downsample_padding=1, norm_eps=1e-5,
)
POSE_WIDTHS = (4, 8, 8, 16)  # the release: (16, 32, 96, 256); 4 widths = 8x downsampling as released
WHISPER = dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, decoder_layers=1,
               decoder_attention_heads=6, decoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500,
               max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)  # whisper-tiny's encoder shape (the release's reshape needs d = 384)
AUDIO_DIM, AUDIO_TOKENS = 384, 50
SIZE, FRAMES, FPS, SECONDS = 64, 16, 24, 1.0


# ----------------------------------------------------------------------------------------------------- checkout


def check_checkout(path: str | os.PathLike) -> tuple[Path, str]:
    """``(root, commit)`` of a checkout of the official repository; a ``UserError`` (one line) otherwise."""
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise UserError(f"--official={str(path)!r}: not a directory (expected a checkout of antgroup/echomimic_v2)")
    missing = [f for f in REQUIRED if not (root / f).is_file()]
    if missing:
        raise UserError(f"--official={str(path)!r}: not a checkout of antgroup/echomimic_v2 (no {missing[0]}"
                        f"{f' and {len(missing) - 1} more of its files' if len(missing) > 1 else ''})")
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (git not available)"
    return root, commit


# ----------------------------------------------------------------------------------------------------- shims


def _ffmpeg_shim() -> types.ModuleType:
    """Stand-in for ffmpeg-python as the release's ``whisper/audio.py::load_audio`` calls it (16 kHz mono s16 wav)."""
    mod = types.ModuleType("ffmpeg")

    class Error(Exception):
        def __init__(self, msg: str):
            super().__init__(msg)
            self.stderr = msg.encode()

    class _Stream:
        def __init__(self, file: str):
            self.file, self.kwargs = file, {}

        def output(self, _target: str, **kwargs: Any) -> "_Stream":
            self.kwargs = kwargs
            return self

        def run(self, cmd: Any = None, capture_stdout: bool = True, capture_stderr: bool = True) -> tuple[bytes, bytes]:
            want = (self.kwargs.get("format"), self.kwargs.get("ac"), self.kwargs.get("ar"))
            if want[:2] != ("s16le", 1):
                raise Error(f"ffmpeg shim: only -f s16le -ac 1 is supported, got {self.kwargs}")
            with wave.open(self.file, "rb") as w:
                if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, want[2]):
                    raise Error(f"ffmpeg shim: {self.file} is not {want[2]} Hz mono 16-bit PCM (no resampling here)")
                return w.readframes(w.getnframes()), b""

    mod.Error = Error
    mod.input = lambda file, **_kw: _Stream(file)
    return mod


class Official:
    """The official modules, imported from the checkout (its ``src`` package) with the shims above."""

    def __init__(self, root: Path):
        sys.modules.setdefault("ffmpeg", _ffmpeg_shim())
        sys.path.insert(0, str(root))
        for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
            del sys.modules[name]  # another package called src must not shadow the checkout's
        from omegaconf import OmegaConf
        from src.models import mutual_self_attention as msa
        from src.models.pose_encoder import PoseEncoder
        from src.models.unet_2d_condition import UNet2DConditionModel
        from src.models.unet_3d_emo import EMOUNet3DConditionModel
        from src.models.whisper.audio2feature import load_audio_model
        from src.pipelines.pipeline_echomimicv2 import EchoMimicV2Pipeline
        from src.pipelines.pipeline_echomimicv2_acc import EchoMimicV2Pipeline as EchoMimicV2PipelineAcc

        rac = msa.ReferenceAttentionControl
        fn = rac.register_reference_hooks
        fn.__defaults__ = tuple(torch.device("cpu") if isinstance(d, torch.device) else d for d in fn.__defaults__)
        self.Control, self.UNet2D, self.UNet3D = rac, UNet2DConditionModel, EMOUNet3DConditionModel
        self.PoseEncoder, self.load_audio_model = PoseEncoder, load_audio_model
        self.Pipeline, self.PipelineAcc = EchoMimicV2Pipeline, EchoMimicV2PipelineAcc
        self.infer_cfg = OmegaConf.load(root / "configs" / "inference" / "inference_v2.yaml")
        self._update_defaults = rac.update.__defaults__

    @contextlib.contextmanager
    def bank_dtype(self, dtype: torch.dtype | None):
        """``None``: the release as it is (``update`` rounds the bank to float16); else ``update``'s default dtype."""
        if dtype is None:
            yield
            return
        self.Control.update.__defaults__ = tuple(dtype if isinstance(d, torch.dtype) else d
                                                 for d in self._update_defaults)
        try:
            yield
        finally:
            self.Control.update.__defaults__ = self._update_defaults

    def unet_additional_kwargs(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        kw = OmegaConf.to_container(self.infer_cfg.unet_additional_kwargs)
        assert kw["cross_attention_dim"] == AUDIO_DIM, kw["cross_attention_dim"]
        return kw


# ----------------------------------------------------------------------------------------------------- inputs


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter, including the zero-initialised ones (so that every path, e.g.
    the motion modules' zero ``proj_out``, contributes): weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.1^2), norm
    scales ~ 1 + N(0, 0.1^2). Buffers (the motion modules' sinusoidal positions) are left as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(z / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * z)
            else:
                p.copy_(0.1 * z)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal with a little noise, peak 0.5 (16 kHz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000.0
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000.0
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2) + 0.05 * rng.standard_normal(t.size)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def write_inputs(work: Path, official: Official, seed: int) -> dict[str, Any]:
    """Random weights in the release's file layout, a wav, a reference image, pose maps."""
    from diffusers import AutoencoderKL
    from PIL import Image
    from transformers import WhisperConfig, WhisperModel

    from halfbody.data.media import write_wav
    from halfbody.models.whisper_openai import save_openai_checkpoint

    rel = work / "pretrained_weights"
    unet_dir = rel / "sd-image-variations-diffusers" / "unet"
    unet_dir.mkdir(parents=True)
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}, indent=1))
    ref = official.UNet2D(**TINY_UNET)
    randomize_(ref, seed)
    torch.save(ref.state_dict(), unet_dir / "diffusion_pytorch_model.bin")  # the "SD" base weights (overwritten)
    torch.save(ref.state_dict(), rel / "reference_unet.pth")
    cfg3 = {**TINY_UNET, "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
            "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3, "mid_block_type": "UNetMidBlock3DCrossAttn"}
    den = official.UNet3D(**{**cfg3, **official.unet_additional_kwargs()})
    randomize_(den, seed + 1)
    sd = den.state_dict()
    torch.save({k: v for k, v in sd.items() if ".motion_modules." not in k}, rel / "denoising_unet.pth")
    torch.save({k: v for k, v in sd.items() if ".motion_modules." in k}, rel / "motion_module.pth")
    pose = official.PoseEncoder(TINY_UNET["block_out_channels"][0], conditioning_channels=3,
                                block_out_channels=POSE_WIDTHS)
    randomize_(pose, seed + 2)
    torch.save(pose.state_dict(), rel / "pose_encoder.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        whisper = WhisperModel(WhisperConfig(**WHISPER))
        vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, sample_size=SIZE, scaling_factor=0.18215,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    save_openai_checkpoint(whisper, rel / "audio_processor" / "tiny.pt")  # float16, as released
    vae.save_pretrained(rel / "sd-vae-ft-mse", safe_serialization=True)
    write_wav(work / "speech.wav", speech_like(SECONDS, seed))
    g = torch.Generator().manual_seed(seed + 4)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(SIZE, SIZE), mode="bilinear")
    Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(work / "ref.png")
    # pose maps as infer.py builds them: uint8 images / 255, (1, 3, F, H, W)
    poses = torch.randint(0, 256, (1, 3, FRAMES, SIZE, SIZE), generator=g).float() / 255.0
    return {"release": rel, "wav": work / "speech.wav", "ref": work / "ref.png", "poses": poses}


# ----------------------------------------------------------------------------------------------------- loading


def load_official(official: Official, rel: Path) -> dict[str, Any]:
    """The official modules loaded the way ``infer.py`` loads them."""
    from diffusers import AutoencoderKL

    base = rel / "sd-image-variations-diffusers"
    reference_unet = official.UNet2D.from_pretrained(str(base), subfolder="unet")
    reference_unet.load_state_dict(torch.load(rel / "reference_unet.pth", map_location="cpu"))
    denoising_unet = official.UNet3D.from_pretrained_2d(str(base), str(rel / "motion_module.pth"), subfolder="unet",
                                                       unet_additional_kwargs=official.infer_cfg.unet_additional_kwargs)
    missing, unexpected = denoising_unet.load_state_dict(torch.load(rel / "denoising_unet.pth", map_location="cpu"),
                                                         strict=False)
    assert not unexpected and all(".motion_modules." in k for k in missing), (missing[:3], unexpected[:3])
    pose = official.PoseEncoder(TINY_UNET["block_out_channels"][0], conditioning_channels=3,
                                block_out_channels=POSE_WIDTHS)
    pose.load_state_dict(torch.load(rel / "pose_encoder.pth"))
    audio = official.load_audio_model(model_path=str(rel / "audio_processor" / "tiny.pt"), device="cpu")
    vae = AutoencoderKL.from_pretrained(str(rel / "sd-vae-ft-mse"))
    for m in (reference_unet, denoising_unet, pose, vae):
        m.eval().requires_grad_(False)
    return {"reference_unet": reference_unet, "denoising_unet": denoising_unet, "pose_encoder": pose,
            "audio_guider": audio, "vae": vae}


def _conf(rel_path: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / rel_path))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_ours(rel: Path) -> dict[str, Any]:
    from halfbody.echomimic_v2.official import network_from_release
    from halfbody.echomimic_v2.pipeline import SamplerSettings
    from halfbody.models.audio_encoders import WhisperAudioEncoder
    from halfbody.models.autoencoders import KLAutoencoder
    from halfbody.models.schedulers import VPredictionDDIM

    net = network_from_release(rel, audio_dim=AUDIO_DIM, audio_tokens=AUDIO_TOKENS, latent_channels=4).eval()
    audio_cfg = {k: v for k, v in _conf("model/audio_encoder/whisper_tiny_release.yaml").items()
                 if k not in ("path", "key")}
    audio = WhisperAudioEncoder(rel / "audio_processor" / "tiny.pt", **audio_cfg)
    scheduler = VPredictionDDIM(**{k: v for k, v in _conf("model/base/echomimic_v2.yaml")["noise_scheduler"].items()
                                   if not k.startswith("_")})
    sampler = {name: SamplerSettings.from_config(_sampler_conf(name)["sampler"]) for name in ("release", "release_acc")}
    return {"network": net, "audio": audio, "autoencoder": KLAutoencoder(rel / "sd-vae-ft-mse"),
            "scheduler": scheduler, "sampler": sampler, "audio_cfg": audio_cfg}


def _sampler_conf(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "model" / "sampler" / f"{name}.yaml")
    if "defaults" in cfg:  # release_acc: defaults [release, _self_]
        base = OmegaConf.load(REPO / "conf" / "model" / "sampler" / "release.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    out = OmegaConf.to_container(cfg)
    return {"sampler": out["sampler"], "steps": out["num_inference_steps"], "cfg": out["guidance_scale"]}


# ----------------------------------------------------------------------------------------------------- measures


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise RuntimeError(f"shapes differ: official {tuple(b.shape)} vs ours {tuple(a.shape)}")
    return {"max_abs_diff": float((a - b).abs().max()), "scale": float(b.abs().max())}


def audio_features(off: dict, ours: dict, wav: Path) -> tuple[dict[str, float], torch.Tensor, int]:
    from halfbody.data.media import load_audio_16k

    guider = off["audio_guider"]
    chunks = torch.from_numpy(guider.feature2chunks(feature_array=guider.audio2feat(str(wav)), fps=FPS)).float()
    samples = torch.from_numpy(load_audio_16k(wav))[None]
    with torch.no_grad():
        feats = ours["audio"](samples, num_frames=chunks.shape[0], fps=FPS)[0]
    return diff(feats, chunks), feats, chunks.shape[0]


def one_forward(official: Official, off: dict, ours: dict, seed: int, cfg_batch: bool,
                dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One denoiser forward with the reference bank in ``dtype`` (the modules must be in it; the official bank is
    kept in it too: ``update(dtype=...)``)."""
    g = torch.Generator().manual_seed(seed)
    b, f, h = 1, 12, SIZE // 8
    x = torch.randn(b, f, 4, h, h, generator=g).to(dtype)
    ref = torch.randn(b, 4, h, h, generator=g).to(dtype)
    audio = torch.randn(b, f, AUDIO_TOKENS, AUDIO_DIM, generator=g).to(dtype)
    pose = torch.rand(b, f, 3, SIZE, SIZE, generator=g).to(dtype)
    t = torch.tensor([601])
    den, refnet, net = off["denoising_unet"], off["reference_unet"], ours["network"]
    with torch.no_grad():
        writer = official.Control(refnet, do_classifier_free_guidance=cfg_batch, mode="write", batch_size=b,
                                  fusion_blocks="full")
        reader = official.Control(den, do_classifier_free_guidance=cfg_batch, mode="read", batch_size=b,
                                  fusion_blocks="full")
        try:
            refnet(ref, torch.zeros_like(t), encoder_hidden_states=None, return_dict=False)
            reader.update(writer, do_classifier_free_guidance=cfg_batch, dtype=x.dtype)  # no rounding of the bank
            pf = off["pose_encoder"](pose.permute(0, 2, 1, 3, 4))
            if cfg_batch:  # the release's CFG batch: unconditional first (zero audio and pose, no bank), then cond
                a, p = torch.cat([torch.zeros_like(audio), audio]), torch.cat([torch.zeros_like(pf), pf])
                xin = torch.cat([x, x])
            else:
                a, p, xin = audio, pf, x
            out_off = den(xin.permute(0, 2, 1, 3, 4), t, encoder_hidden_states=None, audio_cond_fea=a,
                          face_musk_fea=p, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        finally:
            reader.clear()
            writer.clear()
        if cfg_batch:
            keep = torch.tensor([False, True])
            out = net(torch.cat([x, x]), t.expand(2), torch.cat([ref, ref]), torch.cat([audio, audio]),
                      torch.cat([pose, pose]), ref_keep=keep, audio_keep=keep, pose_keep=keep)
        else:
            out = net(x, t, ref, audio, pose)
    return diff(out, out_off)


def sampling(official: Official, off: dict, ours: dict, inputs: dict, variant: str, bank: torch.dtype | None,
             seed: int, steps: int = 6, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """One full sampling run of the official pipeline and ours on the same inputs and initial noise.

    ``bank``: the official reference bank's dtype (``None``: as released, float16). ``dtype=torch.float64`` (the
    modules must be in it): both run in float64 and ours is fed the official audio features (whisper runs in
    float32 on both sides), so the sampler and network arithmetic are compared without float32 rounding."""
    from diffusers import DDIMScheduler
    from PIL import Image

    from halfbody.data.media import load_audio_16k
    from halfbody.echomimic_v2.pipeline import EchoMimicV2Pipeline

    conf = _sampler_conf(variant)
    cfg = conf["cfg"]  # the preset's CFG (release 2.5, release_acc 1.0); steps: --steps (release: 30 / 6)
    sched = DDIMScheduler(**official.infer_cfg.noise_scheduler_kwargs)  # as infer.py builds it
    cls = official.PipelineAcc if variant == "release_acc" else official.Pipeline
    pipe = cls(vae=off["vae"], reference_unet=off["reference_unet"], denoising_unet=off["denoising_unet"],
               audio_guider=off["audio_guider"], pose_encoder=off["pose_encoder"], scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    captured: dict[str, torch.Tensor] = {}
    prep, dec = pipe.prepare_latents_smooth, pipe.decode_latents

    def prepare(*a, **kw):
        captured["noise"] = prep(*a, **kw)
        return captured["noise"]

    def decode(latents):
        captured["latents"] = latents
        return dec(latents)

    pipe.prepare_latents_smooth, pipe.decode_latents = prepare, decode
    ref_pil = Image.open(inputs["ref"]).convert("RGB").resize((SIZE, SIZE))
    t0 = time.perf_counter()
    with official.bank_dtype(bank), contextlib.redirect_stdout(sys.stderr):
        video_off = pipe(ref_pil, str(inputs["wav"]), inputs["poses"].to(dtype), SIZE, SIZE, FRAMES, steps, cfg,
                         generator=torch.Generator().manual_seed(seed), context_frames=12, context_overlap=3,
                         fps=FPS).videos  # (1, 3, F, H, W) in [0, 1]
    t_off = time.perf_counter() - t0

    ours_pipe = EchoMimicV2Pipeline(ours["network"], ours["scheduler"], ours["sampler"][variant], ours["autoencoder"])
    ref = torch.from_numpy(np.asarray(ref_pil, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(dtype)
    samples = torch.from_numpy(load_audio_16k(inputs["wav"]))[None]
    t0 = time.perf_counter()
    with torch.no_grad():
        if dtype == torch.float32:
            feats = ours["audio"](samples, num_frames=FRAMES, fps=FPS)
        else:
            guider = off["audio_guider"]
            with contextlib.redirect_stdout(sys.stderr):
                chunks = guider.feature2chunks(feature_array=guider.audio2feat(str(inputs["wav"])), fps=FPS)
            feats = torch.from_numpy(chunks)[None, :FRAMES].to(dtype)
        ref_latents = ours["autoencoder"].encode_image(ref)
        latents = ours_pipe.sample_latents(ref_latents, feats, inputs["poses"].permute(0, 2, 1, 3, 4).to(dtype), FRAMES,
                                           num_inference_steps=steps, guidance_scale=cfg,
                                           latents=captured["noise"].permute(0, 2, 1, 3, 4))
        video = ours["autoencoder"].decode(latents)  # (1, F, 3, H, W) in [-1, 1]
    t_ours = time.perf_counter() - t0
    return {"variant": variant, "steps": steps, "guidance_scale": cfg,
            "dtype": str(dtype).replace("torch.", ""),
            "bank": "as released (float16)" if bank is None else f"{str(bank).replace('torch.', '')} (shim)",
            "latents": diff(latents, captured["latents"].permute(0, 2, 1, 3, 4)),
            "frames": diff((video.permute(0, 2, 1, 3, 4) + 1) / 2, video_off),
            "seconds": {"official": round(t_off, 2), "ours": round(t_ours, 2)}}


# ----------------------------------------------------------------------------------------------------- main


def run(root: Path, commit: str, seed: int, steps: int = 6) -> dict[str, Any]:
    official = Official(root)
    report: dict[str, Any] = {
        "official_commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": {"unet": TINY_UNET["block_out_channels"], "pose": list(POSE_WIDTHS), "whisper": "tiny shape, random",
                   "pixels": SIZE, "frames": FRAMES, "fps": FPS, "audio_seconds": SECONDS, "seed": seed},
    }
    with tempfile.TemporaryDirectory(prefix="official_parity_") as tmp:
        inputs = write_inputs(Path(tmp), official, seed)
        with contextlib.redirect_stdout(sys.stderr):
            off = load_official(official, inputs["release"])
        ours = load_ours(inputs["release"])
        t0 = time.perf_counter()
        report["audio_features"], _, n = audio_features(off, ours, inputs["wav"])
        report["audio_features"]["frames"] = n
        report["audio_features"]["seconds"] = round(time.perf_counter() - t0, 2)
        report["forward"] = one_forward(official, off, ours, seed, cfg_batch=False)
        report["forward_cfg_batch"] = one_forward(official, off, ours, seed, cfg_batch=True)
        report["sampling"] = [sampling(official, off, ours, inputs, v, bank, seed, steps=steps)
                              for v in ("release", "release_acc") for bank in (torch.float32, None)]
        # the same forward in float64: what is left is a difference of arithmetic, not of rounding
        for m in (off["denoising_unet"], off["reference_unet"], off["pose_encoder"], ours["network"]):
            m.double()
        report["forward_float64"] = one_forward(official, off, ours, seed, cfg_batch=False, dtype=torch.float64)
        report["forward_cfg_batch_float64"] = one_forward(official, off, ours, seed, cfg_batch=True,
                                                          dtype=torch.float64)
        off["vae"].double()
        ours["autoencoder"].double()
        report["sampling"] += [sampling(official, off, ours, inputs, v, torch.float64, seed, steps=steps,
                                        dtype=torch.float64) for v in ("release", "release_acc")]
    return report


def format_report(r: dict[str, Any]) -> str:
    def row(name, d, target):
        ok = "meets" if d["max_abs_diff"] <= target else "MISSES"
        return f"| {name} | {d['max_abs_diff']:.2e} | {d['scale']:.3g} | {target:g} ({ok}) |"

    lines = [f"official commit {r['official_commit']}; {r['date']}; {r['machine']}",
             "| quantity | max abs diff | official max abs | target |", "|---|---|---|---|",
             row(f"audio features ({r['audio_features']['frames']} frames x 50 x 384)", r["audio_features"], 1e-4),
             row("one UNet forward, reference bank (fp32)", r["forward"], 1e-4),
             row("one UNet forward, CFG batch (uncond + cond)", r["forward_cfg_batch"], 1e-4),
             row("one UNet forward, reference bank, float64", r["forward_float64"], 1e-4),
             row("one UNet forward, CFG batch, float64", r["forward_cfg_batch_float64"], 1e-4)]
    for s in r["sampling"]:
        name = f"{s['steps']}-step {s['variant']} CFG {s['guidance_scale']:g}, {s['dtype']}, official bank {s['bank']}"
        lines.append(row(name + ": latents", s["latents"], 1e-3))
        lines.append(row(name + ": frames [0, 1]", s["frames"], 1e-3))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of antgroup/echomimic_v2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps of every sampling run (default 6)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        root, commit = check_checkout(args.official)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    report = run(root, commit, args.seed, args.steps)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(format_report(report))
    print(f"total {report['total_seconds']} s")
    if args.json:
        from halfbody.utils.io import atomic_output

        with atomic_output(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
