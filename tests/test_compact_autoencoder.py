"""The compact learned autoencoder (issue 11): fitted on real shards on first use, cached as safetensors, loaded back
through the config key, the Autoencoder interface (image and causal video), one-line errors."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from halfbody.models.compact_autoencoder import CompactAutoencoder, fit_autoencoder, load_shard_frames
from halfbody.utils.errors import UserError
from shard_utils import make_sample, write_shard


def _blocks(num_frames: int, seed: int) -> np.ndarray:
    """Flat-coloured frames with a moving block: the kind of picture the synthetic world draws."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, 32, 32, 3), np.uint8)
    frames[:] = rng.integers(0, 255, 3)
    colour = rng.integers(0, 255, 3)
    for f in range(num_frames):
        x = 4 + f % 16
        frames[f, 8:20, x:x + 10] = colour
    return frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae_shards")
    write_shard(d / "s-000.tar", [make_sample(f"c{i}", num_frames=8, height=32, width=32, frames=_blocks(8, i))
                                  for i in range(3)])
    return d


def _ae(path, shards, **kw):
    kw = {"spatial_factor": 4, "latent_channels": 4, "width": 16, "fit_shards": str(shards), "fit_resolution": 32,
          "fit_steps": 60, "fit_batch_size": 8, "fit_lr": 5e-3, **kw}
    return CompactAutoencoder(path, **kw)


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory):
    """One fit on first use (what AnimationModule.setup triggers), shared by the tests below."""
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    ae = _ae(path, shards)
    assert not ae.fitted and not path.exists()
    frames = load_shard_frames(str(shards), 32)
    with torch.no_grad():
        before = float((ae.decode_frames(ae.encode_frames(frames)).clamp(-1, 1) - frames).abs().mean())
    ae.prepare()
    return ae, path, frames, before


def test_fit_on_first_use_caches_weights_that_load_back_through_the_config(fitted):
    ae, path, frames, before = fitted
    assert frames.shape == (24, 3, 32, 32) and frames.min() >= -1 and frames.max() <= 1
    assert ae.fitted and path.is_file() and not any(p.requires_grad for p in ae.parameters())
    with torch.no_grad():
        after = float((ae.decode_frames(ae.encode_frames(frames)).clamp(-1, 1) - frames).abs().mean())
    assert after < 0.5 * before  # the fit learned to reconstruct these frames
    # latents are normalised per channel with the fitted statistics
    z = ae.encode_frames(frames)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-2)
    # a later run loads the file (no fit: no shards needed), through the Hydra config as the presets build it
    cfg = {"_target_": "halfbody.models.compact_autoencoder.CompactAutoencoder", "path": str(path),
           "spatial_factor": 4, "latent_channels": 4, "width": 16}
    again = hydra.utils.instantiate(cfg)
    assert again.fitted
    for k, v in load_file(str(path)).items():
        assert torch.equal(again.state_dict()[k], v)
    video = frames[:8].reshape(1, 8, 3, 32, 32)
    assert torch.equal(again.decode(again.encode(video)), ae.decode(ae.encode(video)))


def test_fit_is_deterministic(shards, tmp_path):
    frames = load_shard_frames(str(shards), 32)
    a, b = _ae(None, shards), _ae(None, shards)
    torch.manual_seed(123)  # whatever ran before, the fit starts from the same weights
    fit_autoencoder(a, frames, steps=5, batch_size=4)
    torch.manual_seed(7)
    fit_autoencoder(b, frames, steps=5, batch_size=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_causal_video_folding_matches_the_patch_autoencoder_layout(shards, fitted):
    ae = _ae(fitted[1], shards, temporal_patch=8)
    assert ae.fitted  # loaded, not fitted again
    assert (ae.latent_channels, ae.spatial_factor, ae.temporal_factor) == (32, 4, 8)
    video = torch.rand(2, 17, 3, 32, 32) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 3, 32, 8, 8)
    # the first latent frame holds frame 0 repeated (causal first frame); later ones frames 1-8 and 9-16
    per_frame = ae.encode_frames(video.reshape(-1, 3, 32, 32)).reshape(2, 17, 4, 8, 8)
    assert torch.allclose(z[:, 0].reshape(2, 8, 4, 8, 8), per_frame[:, :1].expand(-1, 8, -1, -1, -1))
    assert torch.allclose(z[:, 2].reshape(2, 8, 4, 8, 8), per_frame[:, 9:17])
    out = ae.decode(z)
    assert out.shape == (2, 17, 3, 32, 32)
    assert torch.allclose(out[:, 5], ae.decode_frames(per_frame[:, 5]).clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ k\\*8"):
        ae.encode(video[:, :12])


def test_errors_name_the_config_key(shards, fitted, tmp_path):
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path='.*missing.safetensors': no compact autoencoder"):
        CompactAutoencoder(tmp_path / "missing.safetensors")
    path = fitted[1]
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path=.*holds compact autoencoder weights for .*'width': 16"):
        CompactAutoencoder(path, spatial_factor=4, latent_channels=4, width=32)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"^model\.autoencoder\.path=.*bad.safetensors.*not a readable safetensors"):
        CompactAutoencoder(bad, spatial_factor=4, latent_channels=4, width=16)
    with pytest.raises(UserError, match=r"spatial_factor=6"):
        CompactAutoencoder(path, spatial_factor=6)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shard(empty / "e.tar", [])
    with pytest.raises(UserError, match=r"^model\.autoencoder\.fit_shards=.*no \.mp4 clips"):
        _ae(tmp_path / "x.safetensors", empty).prepare()
