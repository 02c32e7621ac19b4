"""The principal-component patch autoencoder (issue 11): fitted on real shards on first use, cached as safetensors and
loaded back through the config, an orthogonal projection of the patch tokens (causal video folding included), the
tiny presets training on it, one-line errors."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch

from halfbody.models.autoencoders import PatchAutoencoder
from halfbody.models.fitted_autoencoder import load_shard_clips
from halfbody.models.pca_autoencoder import PCAPatchAutoencoder, principal_directions
from halfbody.utils.errors import UserError
from shard_utils import make_sample, write_shard


def _blocks(num_frames: int, seed: int) -> np.ndarray:
    """Flat-coloured frames with a moving block: the kind of picture the synthetic world draws."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, 16, 16, 3), np.uint8)
    frames[:] = rng.integers(0, 255, 3)
    colour = rng.integers(0, 255, 3)
    for f in range(num_frames):
        frames[f, 4:10, f % 8:f % 8 + 6] = colour
    return frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("pca_shards")
    write_shard(d / "s-000.tar", [make_sample(f"c{i}", num_frames=12, height=16, width=16, frames=_blocks(12, i))
                                  for i in range(4)])
    return d


def test_principal_directions_span_a_low_rank_set_exactly():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(500, 3, generator=g) @ torch.randn(3, 20, generator=g) + torch.randn(20, generator=g)
    mean, basis, explained = principal_directions(tokens, 3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close((tokens - mean) @ basis.T @ basis + mean, tokens, atol=1e-4, rtol=0)
    assert explained.sum() > 0.9999 and bool((explained[:-1] >= explained[1:]).all())


def test_fit_on_first_use_caches_directions_that_load_back_through_the_config(shards, tmp_path):
    path = tmp_path / "pca.safetensors"
    ae = PCAPatchAutoencoder(path, patch_size=4, temporal_patch=1, components=8, fit_shards=str(shards),
                             fit_resolution=16)
    assert not ae.fitted and not path.exists()
    ae.prepare()
    assert ae.fitted and path.is_file() and (ae.latent_channels, ae.spatial_factor) == (8, 4)
    frames = load_shard_clips(str(shards), 16, 1, 48)[:, 0]  # (N, 3, 16, 16): the frames it was fitted on
    video = frames[None]
    z = ae.encode(video)
    assert z.shape == (1, len(frames), 8, 4, 4)
    torch.testing.assert_close(ae.basis @ ae.basis.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal directions
    # the fit's frames come back closely: far closer than the mean token alone
    err, mean_only = (float((ae.decode(x) - video).abs().mean()) for x in (z, torch.zeros_like(z)))
    assert err < 0.03 and err < 0.2 * mean_only
    # the same tensors through the Hydra config (no shards needed: the file is there)
    again = hydra.utils.instantiate({"_target_": "halfbody.models.pca_autoencoder.PCAPatchAutoencoder",
                                     "path": str(path), "patch_size": 4, "temporal_patch": 1, "components": 8})
    assert again.fitted and torch.equal(again.encode(video), z)


def test_causal_video_tokens_are_the_patch_autoencoders_and_all_components_are_lossless(shards, tmp_path):
    ae = PCAPatchAutoencoder(None, patch_size=4, temporal_patch=4, components=192, fit_shards=str(shards),
                             fit_resolution=16)
    ae.prepare()  # windows of 1 + 2 x 4 frames
    assert (ae.latent_channels, ae.temporal_factor) == (192, 4)
    video = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 3, 192, 4, 4)
    patch = PatchAutoencoder(4, 4).encode(video)
    torch.testing.assert_close(torch.einsum("kc,bfkhw->bfchw", ae.basis, z) + ae.mean.view(1, 1, -1, 1, 1), patch,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(ae.decode(z), video, atol=1e-4, rtol=0)  # every direction kept: exact
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        ae.encode(video[:, :8])


@pytest.mark.parametrize("family", ["echomimic_v2", "mirrorme"])
def test_tiny_presets_train_on_it(family, shards, tmp_path):
    from config_utils import compose_train

    overrides = {"echomimic_v2": ["model=echomimic_v2_tiny", "model/autoencoder=pca", "model.autoencoder.patch_size=4"],
                 "mirrorme": ["family=mirrorme", "model=mirrorme_tiny", "model/autoencoder=pca_causal",
                              "model.autoencoder.patch_size=4", "model.autoencoder.temporal_patch=4"]}[family]
    cfg = compose_train(overrides + [f"model.autoencoder.path={tmp_path / 'pca.safetensors'}",
                                     f"model.autoencoder.fit_shards={shards}", "model.autoencoder.fit_resolution=16"])
    model = hydra.utils.instantiate(cfg.model)
    model.autoencoder.prepare()
    ae = model.autoencoder
    assert isinstance(ae, PCAPatchAutoencoder) and ae.fitted
    frames = 9 if family == "mirrorme" else 4
    video = load_shard_clips(str(shards), 16, frames, 2)
    b = {"video": video, "ref": video[:, 0], "audio": torch.randn(2, int(16000 * frames / 25)) * 0.1,
         "pose": torch.rand(2, frames, 3, 16, 16), "mask_face": torch.ones(2, frames, 1, 16, 16),
         "mask_lips": torch.ones(2, frames, 1, 16, 16), "mask_head": torch.ones(2, frames, 1, 16, 16),
         "valid": torch.ones(2, frames, 1, 16, 16), "fps": torch.full((2,), 25.0)}
    loss, _ = model.diffusion_loss(b, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.network.parameters())
    assert not any(p.requires_grad for p in ae.parameters())


def test_errors_name_the_config_key(shards, tmp_path):
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path='.*missing.safetensors': no principal directions"):
        PCAPatchAutoencoder(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match=r"^model\.autoencoder\.components=200: must be in \[1, 192\]"):
        PCAPatchAutoencoder(None, patch_size=8, components=200, fit_shards=str(shards))
    path = tmp_path / "p.safetensors"
    PCAPatchAutoencoder(None, patch_size=4, components=8, fit_shards=str(shards), fit_resolution=16).save_weights(path)
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path=.*holds principal directions for .*'components': 8"):
        PCAPatchAutoencoder(path, patch_size=4, components=16)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path=.*bad.safetensors.*not a readable safetensors"):
        PCAPatchAutoencoder(bad, patch_size=4, components=8)
    short = tmp_path / "short"
    short.mkdir()
    write_shard(short / "s.tar", [make_sample("c", num_frames=6, height=16, width=16, frames=_blocks(6, 0))])
    with pytest.raises(UserError, match=r"^model\.autoencoder\.fit_shards=.*no clip .* decodes to 9 frame\(s\)"):
        PCAPatchAutoencoder(None, patch_size=4, temporal_patch=4, components=8, fit_shards=str(short),
                            fit_resolution=16).prepare()
