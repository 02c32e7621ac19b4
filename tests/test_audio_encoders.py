"""Audio encoders: tiny random Whisper / wav2vec2 saved to disk and loaded back through the real loading path."""

from __future__ import annotations

import math

import pytest
import torch

from halfbody.models.audio_encoders import (AudioEncoder, Wav2Vec2AudioEncoder, WhisperAudioEncoder,
                                            frame_window_indices)
from halfbody.models.pretrained import PretrainedNotFoundError

SR = 16000
TINY_WHISPER = dict(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16,
                    max_source_positions=50, max_target_positions=16, vocab_size=64, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # 50 positions = 1 s window
TINY_W2V = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                vocab_size=8)  # the real conv geometry: stride 320, receptive field 400


def _audio(b: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, int(round(seconds * SR)), generator=g) * 0.1


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    d = tmp_path_factory.mktemp("ckpt") / "whisper-tiny-test"
    torch.manual_seed(0)
    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(d)
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    d = tmp_path_factory.mktemp("ckpt") / "wav2vec2-test"
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_W2V)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def whisper(whisper_dir) -> WhisperAudioEncoder:
    return WhisperAudioEncoder(whisper_dir, key="model.audio_encoder.path", window=2)


@pytest.fixture(scope="module")
def w2v(w2v_dir) -> Wav2Vec2AudioEncoder:
    return Wav2Vec2AudioEncoder(w2v_dir, key="model.audio_encoder.path", window=3)


def test_window_indices() -> None:
    idx = frame_window_indices(4, fps=25, window=2, num_steps=7)
    assert idx.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 6, 6]]
    assert frame_window_indices(3, fps=20, window=0, num_steps=100).flatten().tolist() == [0, 3, 5]  # 2.5 -> 3


@pytest.mark.parametrize("num_frames,fps", [(12, 25.0), (7, 30.0), (5, 12.5)])
def test_whisper_shapes(whisper: WhisperAudioEncoder, num_frames: int, fps: float) -> None:
    assert isinstance(whisper, AudioEncoder)
    assert whisper.num_layers == 3 and whisper.hidden_size == 16
    assert whisper.tokens_per_frame == 5 and whisper.feature_dim == 48
    audio = _audio(2, num_frames / fps)
    with torch.no_grad():
        out = whisper(audio, num_frames, fps)
    assert out.shape == (2, num_frames, 5, 48) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_whisper_alignment_batch_and_chunking(whisper: WhisperAudioEncoder) -> None:
    fps, num_frames = 30.0, 20
    audio = _audio(3, num_frames / fps, seed=1)
    with torch.no_grad():
        seq = whisper.sequence_features(audio)
        out = whisper(audio, num_frames, fps)
        alone = whisper(audio[1:2], num_frames, fps)
    assert seq.shape == (3, math.ceil(audio.shape[1] / 320), 3, 16)
    for i in range(num_frames):
        c = min(math.floor(i / fps * 50 + 0.5), seq.shape[1] - 1)
        torch.testing.assert_close(out[:, i, 2], seq[:, c].flatten(1))  # centre token, layers concatenated
    torch.testing.assert_close(alone[0], out[1], rtol=1e-4, atol=1e-5)  # batch consistency
    # a clip longer than the 1 s encoder window is encoded window by window
    long = _audio(1, 2.25, seed=2)
    with torch.no_grad():
        seq_long = whisper.sequence_features(long)
        first = whisper.sequence_features(long[:, :16000])
    assert seq_long.shape == (1, 113, 3, 16)
    torch.testing.assert_close(seq_long[:, :50], first, rtol=1e-4, atol=1e-5)
    assert whisper(long, 56, 25.0).shape == (1, 56, 5, 48)


def test_whisper_layouts_identity_and_frozen(whisper_dir, whisper: WhisperAudioEncoder) -> None:
    tok = WhisperAudioEncoder(whisper_dir, window=1, layer_layout="tokens")
    assert (tok.tokens_per_frame, tok.feature_dim) == (9, 16)
    last = WhisperAudioEncoder(whisper_dir, window=1, layers="last")
    assert (last.tokens_per_frame, last.feature_dim) == (3, 16)
    audio = _audio(1, 0.4)
    with torch.no_grad():
        a, b = tok(audio, 10, 25.0), whisper(audio, 10, 25.0)
    assert a.shape == (1, 10, 9, 16)
    torch.testing.assert_close(a[:, :, 3:6].flatten(2), b[:, :, 2])  # same centre step, two layouts
    ids = {whisper.identity, tok.identity, last.identity}
    assert len(ids) == 3 and all("." not in i and i.startswith("whisper-whisper-tiny-test-") for i in ids)
    assert not any(p.requires_grad for p in whisper.parameters())
    torch.nn.Sequential(whisper).train()
    assert not whisper.training and not whisper.encoder.training


def test_whisper_without_preprocessor_config(tmp_path) -> None:
    from transformers import WhisperConfig, WhisperModel

    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(tmp_path / "w")
    enc = WhisperAudioEncoder(tmp_path / "w")
    assert enc.feature_extractor.feature_size == 16 and enc.window_samples == 16000
    with torch.no_grad():
        assert enc(_audio(1, 0.5), 12, 24.0).shape == (1, 12, 5, 48)


@pytest.mark.parametrize("num_frames,fps", [(12, 25.0), (7, 30.0), (3, 12.5)])
def test_wav2vec2_shapes(w2v: Wav2Vec2AudioEncoder, num_frames: int, fps: float) -> None:
    assert w2v.num_layers == 3 and w2v.receptive_field == 400 and w2v.conv_stride == 320
    assert w2v.tokens_per_frame == 7 and w2v.feature_dim == 48
    audio = _audio(2, num_frames / fps)
    with torch.no_grad():
        out = w2v(audio, num_frames, fps)
        seq = w2v.sequence_features(audio)
    assert out.shape == (2, num_frames, 7, 48)
    assert seq.shape == (2, math.ceil(audio.shape[1] / 320), 3, 16)


def test_wav2vec2_alignment_and_batch(w2v: Wav2Vec2AudioEncoder) -> None:
    fps, num_frames = 25.0, 15
    audio = _audio(3, num_frames / fps, seed=3)
    with torch.no_grad():
        seq = w2v.sequence_features(audio)
        out = w2v(audio, num_frames, fps)
        alone = w2v(audio[2:3], num_frames, fps)
        native = torch.stack(w2v.model((audio - audio.mean(1, keepdim=True))
                                       / (audio.var(1, keepdim=True, unbiased=False) + 1e-7).sqrt(),
                                       output_hidden_states=True).hidden_states, dim=2)
    for i in range(num_frames):
        c = min(math.floor(i / fps * 50 + 0.5), seq.shape[1] - 1)
        torch.testing.assert_close(out[:, i, 3], seq[:, c].flatten(1))
    torch.testing.assert_close(alone[0], out[2], rtol=1e-4, atol=1e-5)
    # 50 Hz step n sits 1/8 of a native frame before native frame n: a 7:1 blend of frames n and n-1
    n = 10
    torch.testing.assert_close(seq[:, n], native[:, n - 1] * 0.125 + native[:, n] * 0.875, rtol=1e-4, atol=1e-5)
    # very short audio is padded to the receptive field
    assert w2v(_audio(1, 0.01), 1, 25.0).shape == (1, 1, 7, 48)


def test_random_config_and_missing_dirs(tmp_path) -> None:
    a = Wav2Vec2AudioEncoder(None, random_config=TINY_W2V, seed=1, layers="last", window=0)
    b = Wav2Vec2AudioEncoder(None, random_config=TINY_W2V, seed=1, layers="last", window=0)
    assert a.identity == b.identity and "random-s1" in a.identity
    wa, wb = a.model.feature_projection.projection.weight, b.model.feature_projection.projection.weight
    torch.testing.assert_close(wa, wb)
    with pytest.raises(PretrainedNotFoundError, match="model.audio_encoder.path.*Whisper"):
        WhisperAudioEncoder(tmp_path / "missing", key="model.audio_encoder.path")
    with pytest.raises(PretrainedNotFoundError, match="audio.w2v.*Wav2Vec2"):
        Wav2Vec2AudioEncoder(None, key="audio.w2v")


def test_asymmetric_window_floor_centring_and_bad_settings(whisper_dir) -> None:
    enc = WhisperAudioEncoder(whisper_dir, window=[1, 2], centring="floor")
    assert (enc.window, enc.tokens_per_frame, enc.feature_dim) == ((1, 2), 4, 48)
    assert "w1_2-floor-concat" in enc.identity and "." not in enc.identity
    audio = _audio(1, 0.5)
    with torch.no_grad():
        seq, out = enc.sequence_features(audio), enc(audio, 12, 30.0)
    for i in range(12):  # steps floor(i * 50 / 30) - 1 .. + 2, layers concatenated
        c = int(i * 50 / 30.0)
        want = torch.stack([seq[0, min(max(j, 0), seq.shape[1] - 1)].flatten() for j in range(c - 1, c + 3)])
        torch.testing.assert_close(out[0, i], want)
    assert WhisperAudioEncoder(whisper_dir, window=[2, 2]).identity == WhisperAudioEncoder(whisper_dir).identity
    for bad, match in ((dict(window=[-1, 2]), "window"), (dict(window=[1, 2, 3]), "window"),
                       (dict(centring="ceil"), "centring"), (dict(layers="first"), "layers"),
                       (dict(mel="librosa"), "mel")):
        with pytest.raises(ValueError, match=match):
            WhisperAudioEncoder(whisper_dir, **bad)
