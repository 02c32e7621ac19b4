"""The released EchoMimicV2 files: strict import, lossless export, the paper preset's release parameter counts, and
one-line errors for bad files (issue 10 §3-§4).

The release's weights are not available here, so the tests write tiny state dicts with the release's key names
and shapes, built independently of the project's network code: the reference UNet is diffusers' UNet without the
transformer blocks' ``attn2`` / ``norm2`` (the release's ``reference_unet.pth`` has none), the denoiser is diffusers'
UNet with 384-style audio-width ``attn2`` keys/values, and the motion modules follow the release's
``motion_module.py`` naming, written out below by hand.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from halfbody.echomimic_v2.network import SD15_UNET_CONFIG, EchoMimicV2Network
from halfbody.echomimic_v2.official import (
    build_release_network,
    export_release,
    main,
    network_from_release,
    release_parameter_counts,
)
from halfbody.utils.errors import UserError
from test_pretrained_presets import pretrained_dir  # noqa: F401  (fixture: tiny pretrained parts on disk)

AUDIO_DIM, AUDIO_TOKENS = 24, 6
POSE = (4, 8, 8, 16)  # the release: (16, 32, 96, 256) -> 320
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, attention_head_dim=8, cross_attention_dim=48,
)


def motion_module_state(prefix: str, c: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One released motion module (VanillaTemporalModule, 1 block of 2 Temporal_Self attentions, pe of 32 frames)."""
    t = f"{prefix}.temporal_transformer."
    shapes = {"norm.weight": (c,), "norm.bias": (c,), "proj_in.weight": (c, c), "proj_in.bias": (c,),
              "proj_out.weight": (c, c), "proj_out.bias": (c,)}
    blk = "transformer_blocks.0."
    for j in range(2):
        a = f"{blk}attention_blocks.{j}."
        shapes.update({a + "to_q.weight": (c, c), a + "to_k.weight": (c, c), a + "to_v.weight": (c, c),
                       a + "to_out.0.weight": (c, c), a + "to_out.0.bias": (c,), a + "pos_encoder.pe": (1, 32, c),
                       f"{blk}norms.{j}.weight": (c,), f"{blk}norms.{j}.bias": (c,)})
    shapes.update({blk + "ff.net.0.proj.weight": (8 * c, c), blk + "ff.net.0.proj.bias": (8 * c,),
                   blk + "ff.net.2.weight": (c, 4 * c), blk + "ff.net.2.bias": (c,),
                   blk + "ff_norm.weight": (c,), blk + "ff_norm.bias": (c,)})
    return {t + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def release_files(seed: int = 0, dtype: torch.dtype = torch.float32, unet: dict | None = None,
                  audio_dim: int = AUDIO_DIM, pose_widths: tuple[int, ...] = POSE) -> dict[str, dict[str, torch.Tensor]]:
    """Tiny state dicts in the release's layout (random values)."""
    unet = dict(unet or TINY_UNET)
    g = torch.Generator().manual_seed(seed)

    def rand(sd):
        return {k: torch.randn(v.shape, generator=g).to(dtype) for k, v in sd.items()}

    with torch.device("meta"):
        ref = UNet2DConditionModel(**unet).state_dict()
        den = UNet2DConditionModel(**{**unet, "cross_attention_dim": audio_dim}).state_dict()
    ref = {k: v for k, v in ref.items()
           if not re.search(r"transformer_blocks\.\d+\.(attn2|norm2)\.", k) and not k.startswith(("conv_norm_out", "conv_out"))}
    chans, n = unet["block_out_channels"], unet["layers_per_block"]
    motion: dict[str, torch.Tensor] = {}
    for i, c in enumerate(chans):
        for j in range(n):
            motion.update(motion_module_state(f"down_blocks.{i}.motion_modules.{j}", c, g))
    motion.update(motion_module_state("mid_block.motion_modules.0", chans[-1], g))
    for i, c in enumerate(reversed(chans)):
        for j in range(n + 1):
            motion.update(motion_module_state(f"up_blocks.{i}.motion_modules.{j}", c, g))
    pw = pose_widths
    pose = {"conv_in.weight": (pw[0], 3, 3, 3), "conv_in.bias": (pw[0],),
            "conv_out.weight": (unet["block_out_channels"][0], pw[-1], 3, 3), "conv_out.bias": (unet["block_out_channels"][0],)}
    for i, (a, b) in enumerate(zip(pw[:-1], pw[1:])):
        pose.update({f"blocks.{2 * i}.weight": (a, a, 3, 3), f"blocks.{2 * i}.bias": (a,),
                     f"blocks.{2 * i + 1}.weight": (b, a, 3, 3), f"blocks.{2 * i + 1}.bias": (b,)})
    return {"reference_unet.pth": rand(ref), "denoising_unet.pth": rand(den),
            "motion_module.pth": {k: v.to(dtype) for k, v in motion.items()},
            "pose_encoder.pth": {k: torch.randn(s, generator=g).to(dtype) for k, s in pose.items()}}


def write_release(d, files, acc: dict | None = None):
    d.mkdir(parents=True, exist_ok=True)
    for name, sd in files.items():
        torch.save(sd, d / name)
    for name, sd in (acc or {}).items():
        torch.save(sd, d / name)
    (d / "sd-image-variations-diffusers" / "unet").mkdir(parents=True)
    (d / "sd-image-variations-diffusers" / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    return d


def load(d, **kw) -> EchoMimicV2Network:
    return network_from_release(d, audio_dim=AUDIO_DIM, audio_tokens=AUDIO_TOKENS, latent_channels=4,
                                pose_block_out_channels=list(POSE), **kw)


def assert_same_files(a: dict[str, dict[str, torch.Tensor]], d) -> None:
    for name, sd in a.items():
        back = torch.load(d / name, weights_only=True)
        assert back.keys() == sd.keys(), name
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), f"{name}:{k}"


def test_release_files_load_strictly_run_and_round_trip(tmp_path):
    files = release_files()
    d = write_release(tmp_path / "release", files)
    net = load(d)
    assert len(net.denoising_unet.temporal_modules()) == 7  # 2 down + 1 mid + 2 x 2 up at this size
    # every tensor of every file went somewhere, and every tensor of the network came from a file
    counts = release_parameter_counts(net)
    assert {f"{p}.pth": c["tensors"] for p, c in counts.items()} == {n: len(sd) for n, sd in files.items()}
    state = net.state_dict()
    assert torch.equal(state["denoising_unet.unet.mid_block.motion_modules.0.temporal_transformer.proj_out.weight"],
                       files["motion_module.pth"]["mid_block.motion_modules.0.temporal_transformer.proj_out.weight"])
    # The imported network runs (audio tokens straight into attn2, gain 3.0) ...
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = net(torch.randn(1, 2, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 4, 8, 8, generator=g),
                  torch.randn(1, 2, AUDIO_TOKENS, AUDIO_DIM, generator=g), torch.rand(1, 2, 3, 64, 64, generator=g))
    assert out.shape == (1, 2, 4, 8, 8) and torch.isfinite(out).all()
    # ... and exports back to the same files, bit for bit.
    export_release(net, tmp_path / "out")
    assert_same_files(files, tmp_path / "out")
    # A denoiser file that also carries motion-module tensors: as in the official infer.py (denoising_unet.pth is
    # loaded last), its copies win.
    both = {k: dict(v) for k, v in files.items()}
    key = "up_blocks.1.motion_modules.1.temporal_transformer.proj_in.weight"
    both["denoising_unet.pth"][key] = torch.full_like(files["motion_module.pth"][key], 7.0)
    net2 = load(write_release(tmp_path / "both", both))
    assert (net2.state_dict()[f"denoising_unet.unet.{key}"] == 7.0).all()
    # fp16 files (as the release may store them) load into fp32 and export back to the same fp16 bits.
    half = release_files(seed=2, dtype=torch.float16)
    net16 = load(write_release(tmp_path / "release16", half))
    assert next(net16.parameters()).dtype == torch.float32
    export_release(net16, tmp_path / "out16", dtype=torch.float16)
    assert_same_files(half, tmp_path / "out16")


def test_cli_import_both_variants_and_export_from_network_and_checkpoint(tmp_path, capsys):
    from transformers import WhisperConfig, WhisperModel

    from halfbody.models.whisper_openai import save_openai_checkpoint

    files, acc = release_files(seed=3), release_files(seed=4)
    d = write_release(tmp_path / "release", files, {"denoising_unet_acc.pth": acc["denoising_unet.pth"],
                                                    "motion_module_acc.pth": acc["motion_module.pth"]})
    (d / "sd-vae-ft-mse").mkdir()
    (d / "sd-vae-ft-mse" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    (d / "sd-vae-ft-mse" / "diffusion_pytorch_model.bin").write_bytes(b"")
    torch.manual_seed(0)
    whisper = WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                         num_mel_bins=80, max_source_positions=20, max_target_positions=8,
                                         vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1))
    save_openai_checkpoint(whisper, d / "audio_processor" / "tiny.pt")

    assert main(["import", "--dir", str(d), "--out", str(tmp_path / "imported")]) == 0
    manifest = json.loads((tmp_path / "imported" / "release.json").read_text())
    assert set(manifest["variants"]) == {"standard", "acc"} and manifest["whisper"]["checked"]
    assert main(["export", "--network", str(tmp_path / "imported" / "network_acc"), "--out", str(tmp_path / "acc"),
                 "--variant", "acc"]) == 0
    assert_same_files({"denoising_unet_acc.pth": acc["denoising_unet.pth"],
                       "motion_module_acc.pth": acc["motion_module.pth"],
                       "reference_unet.pth": files["reference_unet.pth"], "pose_encoder.pth": files["pose_encoder.pth"]},
                      tmp_path / "acc")
    # A Lightning checkpoint of the model exports its network.* weights.
    net = EchoMimicV2Network.from_pretrained(tmp_path / "imported" / "network")
    ckpt = {"state_dict": {f"network.{k}": v for k, v in net.state_dict().items()}, "pytorch-lightning_version": "2"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "std")]) == 0
    assert_same_files(files, tmp_path / "std")
    # bad input through the CLI: one line, exit code 2
    capsys.readouterr()
    (d / "pose_encoder.pth").unlink()
    with pytest.raises(SystemExit) as e:
        main(["import", "--dir", str(d), "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "pose_encoder.pth: missing" in err


def test_bad_release_files_name_the_file_and_the_key(tmp_path):
    files = release_files()
    # a mis-shaped tensor and a key the network does not have
    bad = {k: dict(v) for k, v in files.items()}
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    bad["reference_unet.pth"][key] = torch.zeros(3, 3)
    bad["motion_module.pth"]["down_blocks.0.motion_modules.0.temporal_transformer.extra"] = torch.zeros(1)
    del bad["pose_encoder.pth"]["conv_out.bias"]
    with pytest.raises(UserError) as e:
        load(write_release(tmp_path / "a", bad))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"reference_unet.pth: 1 mis-shaped key(s): {key} (3, 3) (expected (32, 32))" in msg
    assert "motion_module.pth: 1 unexpected key(s): down_blocks.0.motion_modules.0.temporal_transformer.extra" in msg
    assert "pose_encoder.pth: 1 missing key(s): conv_out.bias" in msg
    # another family's file (here: a MirrorMe-like transformer state dict) in the denoiser's place
    other = {k: dict(v) for k, v in files.items()}
    other["denoising_unet.pth"] = {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8)}
    with pytest.raises(UserError, match=r"denoising_unet\.pth: not an EchoMimicV2 denoising_unet checkpoint"):
        load(write_release(tmp_path / "b", other))
    # a Lightning checkpoint where a release file belongs, a truncated file, a missing file
    d = write_release(tmp_path / "c", files)
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2"}, d / "motion_module.pth")
    with pytest.raises(UserError, match=r"motion_module\.pth: a Lightning training checkpoint"):
        load(d)
    (d / "motion_module.pth").write_bytes((d / "pose_encoder.pth").read_bytes()[:100])
    with pytest.raises(UserError, match=r"motion_module\.pth: cannot be read"):
        load(d)
    (d / "motion_module.pth").unlink()
    with pytest.raises(UserError, match=r"motion_module\.pth: missing"):
        load(d)
    # audio features that are not the release's width
    with pytest.raises(UserError, match=r"model.audio_encoder gives 7-dim features.*attn2 takes 24"):
        network_from_release(write_release(tmp_path / "e", files), audio_dim=7, audio_tokens=AUDIO_TOKENS)
    # the projection ablation has no place in the release's files
    proj = build_release_network(TINY_UNET, AUDIO_DIM, AUDIO_TOKENS, device="cpu", audio_attention="projection",
                                 pose_block_out_channels=list(POSE))
    with pytest.raises(UserError, match="audio_projection"):
        export_release(proj, tmp_path / "proj")


def test_paper_preset_has_the_release_parameter_counts():
    """Built on the meta device from sd-image-variations' UNet config. The expected figures are those of the
    official modules (EMOUNet3DConditionModel with inference_v2.yaml, the release's UNet2DConditionModel and
    PoseEncoder(320, 3, (16, 32, 96, 256))), built on the meta device from a checkout of antgroup/echomimic_v2."""
    net = build_release_network(SD15_UNET_CONFIG)
    counts = release_parameter_counts(net)
    assert counts == {
        "reference_unet": {"tensors": 570, "numel": 815_521_280},
        "denoising_unet": {"tensors": 686, "numel": 849_936_324},
        "motion_module": {"tensors": 588, "numel": 454_417_600},  # 453,209,280 parameters + 21 x 2 pe buffers
        "pose_encoder": {"tensors": 16, "numel": 1_086_480},
    }
    assert len(net.denoising_unet.temporal_modules()) == 21
    # trainable: everything but the ReferenceNet's tail after the last bank write (and the pe buffers)
    assert sum(p.numel() for p in net.parameters()) == 2_118_008_404


def test_unet_dir_with_bin_weights_loads(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    net = EchoMimicV2Network.from_pretrained_parts(tmp_path / "unet", audio_dim=AUDIO_DIM, audio_tokens=AUDIO_TOKENS,
                                                   pose_block_out_channels=list(POSE))
    assert torch.equal(net.reference_net.unet.conv_in.weight, unet.conv_in.weight)


def test_official_network_config_builds_the_release(tmp_path):
    """conf/model/network/echomimic_v2_official.yaml: the partial the model calls fills the network from the files."""
    import hydra
    from omegaconf import OmegaConf

    from halfbody.utils.hydra import CONFIG_DIR

    files = release_files(seed=5)
    d = write_release(tmp_path / "pretrained" / "EchoMimicV2", files)
    cfg = OmegaConf.load(CONFIG_DIR / "model" / "network" / "echomimic_v2_official.yaml")
    cfg.release_dir = str(d)
    cfg.unet_config = str(d / "sd-image-variations-diffusers" / "unet")
    build = hydra.utils.instantiate(cfg)
    net = build(latent_channels=4, latent_factor=8, audio_dim=AUDIO_DIM, audio_tokens=AUDIO_TOKENS)
    export_release(net, tmp_path / "out")
    assert_same_files(files, tmp_path / "out")
    with pytest.raises(UserError, match="model.autoencoder has spatial factor 4, but .*pose_encoder.pth downsamples by 8"):
        build(latent_channels=4, latent_factor=4, audio_dim=AUDIO_DIM, audio_tokens=AUDIO_TOKENS)
    # fine-tuning starts from it: every trainable group gets gradients from one loss
    g = torch.Generator().manual_seed(2)
    out = net(torch.randn(1, 2, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 4, 8, 8, generator=g),
              torch.randn(1, 2, AUDIO_TOKENS, AUDIO_DIM, generator=g), torch.rand(1, 2, 3, 64, 64, generator=g))
    out.square().mean().backward()
    for name, mods in net.module_groups().items():
        assert all(p.grad is not None for m in mods for p in m.parameters()), name


def test_model_fine_tunes_from_the_release(pretrained_dir, tmp_path):
    """model=echomimic_v2 model/network=echomimic_v2_official: the whole model (VAE, the release's Whisper file,
    the release's network files) builds through the config, takes a training step and samples."""
    import hydra
    from hydra import compose, initialize_config_dir

    from data_pipelines.synthetic_world import generate_shards
    from halfbody.data.datamodule import HalfBodyDataModule
    from halfbody.echomimic_v2.network import tiny_unet_config
    from halfbody.utils.hydra import CONFIG_DIR
    root = pretrained_dir  # tiny sd-image-variations UNet, sd-vae-ft-mse and the release's tiny.pt (d_model 32)
    unet = {k: v for k, v in tiny_unet_config(latent_channels=4).items()}
    files = release_files(seed=7, unet=unet, audio_dim=32, pose_widths=(8, 16, 32))  # whisper d_model 32, factor 4
    for name, sd in files.items():
        torch.save(sd, root / "EchoMimicV2" / name)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=echomimic_v2", "model/network=echomimic_v2_official", f"paths.pretrained_dir={root}",
            "model.phd_loss=null"])
    model = hydra.utils.instantiate(cfg.model)
    state = model.network.state_dict()
    key = "mid_block.motion_modules.0.temporal_transformer.proj_out.weight"
    assert torch.equal(state[f"denoising_unet.unet.{key}"], files["motion_module.pth"][key])
    shards = generate_shards(tmp_path / "world", num_clips=2, num_frames=16, resolution=64, workers=0, headshot_fraction=0)
    dm = HalfBodyDataModule([str(p) for p in shards], num_frames=4, resolution=32, batch_size=1, num_workers=0,
                            batches_per_epoch=1, val_samples=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss, _ = model.diffusion_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for m in model.network.module_groups()["temporal"] for p in m.parameters())
