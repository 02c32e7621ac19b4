"""The paper-scale preset through the real config path: tiny random parts saved with ``save_pretrained`` load
back via ``model=echomimic_v2``, train a step and sample; missing directories fail naming their config key."""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from config_utils import compose_train
from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.utils.hydra import CONFIG_DIR


def _model_cfg(overrides: list[str]):
    return compose_train(["model=echomimic_v2", *overrides]).model


def test_missing_pretrained_dirs_name_the_config_key(tmp_path):
    cfg = _model_cfg([f"paths.pretrained_dir={tmp_path}/nothing-here"])
    with pytest.raises(Exception) as err:
        hydra.utils.instantiate(cfg)
    text = "".join(str(e) for e in (err.value, err.value.__cause__) if e)
    # the first part to load is the autoencoder: its key and the expected layout are named
    assert "model.autoencoder.path" in text and "not a directory" in text


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """Tiny random stand-ins of SD1.5's UNet, sd-vae-ft-mse and whisper-tiny in the layout the config expects."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from halfbody.echomimic_v2.network import tiny_unet_config

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    UNet2DConditionModel(**tiny_unet_config(latent_channels=4)).save_pretrained(root / "sd-image-variations-diffusers" / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
                  scaling_factor=0.18215).save_pretrained(root / "sd-vae-ft-mse")
    whisper = WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                                         decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128,
                                         num_mel_bins=16, max_source_positions=50, max_target_positions=8,
                                         vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1))
    whisper.save_pretrained(root / "whisper-tiny")
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(root / "whisper-tiny")
    # the release's audio_processor/tiny.pt: OpenAI's format (MLPs 4 x d_model)
    from halfbody.models.whisper_openai import save_openai_checkpoint

    save_openai_checkpoint(whisper, root / "EchoMimicV2" / "audio_processor" / "tiny.pt")
    # the PhD loss's extractors: an AlexNet backbone for LPIPS and an exported keypoint-heatmap model
    import torchvision

    alex = torchvision.models.alexnet(weights=None).state_dict()
    (root / "lpips").mkdir()
    torch.save({k: v for k, v in alex.items() if k.startswith("features.")}, root / "lpips" / "alexnet.pth")
    heatmaps = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1), torch.nn.Sigmoid()).eval()
    program = torch.export.export(heatmaps, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(root / "pose_extractor.pt2"))
    return root


def test_paper_preset_loads_saved_parts_trains_and_samples(pretrained_dir, tmp_path):
    from data_pipelines.synthetic_world import generate_shards

    cfg = _model_cfg([f"paths.pretrained_dir={pretrained_dir}", "model.num_inference_steps=2", "model.phd_loss=null",
                      "+model.network.pose_block_out_channels=[8,16,32]", "+model.network.temporal_num_attention_heads=4"])
    model = hydra.utils.instantiate(cfg)
    assert model.autoencoder.spatial_factor == 4 and model.autoencoder.latent_channels == 4
    # the release's Whisper features: 10 steps x (embedding + 2 blocks) tokens of d_model
    assert (model.audio_encoder.tokens_per_frame, model.audio_encoder.feature_dim) == (10 * 3, 32)
    unet = model.network.denoising_unet.unet
    # the release's attn2 takes the audio tokens as keys/values (d_model wide); the saved UNet's 64 is replaced
    assert unet.config.cross_attention_dim == 32 and unet.config.in_channels == 4

    shards = generate_shards(tmp_path / "world", num_clips=2, num_frames=16, resolution=64, workers=0, headshot_fraction=0)
    dm = HalfBodyDataModule([str(p) for p in shards], num_frames=4, resolution=32, batch_size=2, num_workers=0,
                            batches_per_epoch=1, val_samples=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss, _ = model.diffusion_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.network.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.autoencoder.parameters())  # frozen
    video = model.generate(batch, num_inference_steps=2)
    assert video.shape == batch["video"].shape and video.abs().max() <= 1


def test_apdh_stage3_runs_at_paper_scale_when_the_pretrained_parts_exist(pretrained_dir, tmp_path):
    """experiment=apdh_stage3 with the paper-scale model config (every part loaded from pretrained/), through all
    four sub-phases; only the compute is cut down for CPU (trainer, resolution, one step per phase)."""
    from omegaconf import open_dict

    from data_pipelines.synthetic_world import generate_shards
    from halfbody.train import train

    generate_shards(tmp_path / "world", num_clips=4, num_frames=12, resolution=64, workers=0, headshot_fraction=0.5)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=apdh_stage3", f"paths.pretrained_dir={pretrained_dir}", f"data.train_shards={tmp_path}/world",
            "trainer=cpu", "trainer.precision=32-true", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "logger=none", "callbacks.curriculum.max_steps_per_phase=1", "callbacks.model_checkpoint.every_n_train_steps=1",
            "data.resolution=32", "data.batch_size=1", "data.num_workers=0",
            "+model.network.pose_block_out_channels=[8,16,32]", "+model.network.temporal_num_attention_heads=4"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert cfg.model.phd_loss._target_ == "halfbody.losses.phd.PhDLoss"  # the paper-scale extractors
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and state["callbacks"]["CurriculumCallback"]["phase_name"] == "audio_body"
