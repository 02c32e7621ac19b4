"""The audio context (EchoMimicV2 parity issue §1): the encoder hears the clip around the training window, and each
frame's feature window is sliced from the context's features, so a frame's features do not depend on the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halfbody.data.dataset import ClipConfig, SampleBuilder, collate_samples
from halfbody.models.audio_encoders import Wav2Vec2AudioEncoder, WhisperAudioEncoder
from shard_utils import decode_index, make_sample

SR, FPS, CLIP = 16000, 25.0, 30
TINY_WHISPER = dict(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                    max_source_positions=100, max_target_positions=16, vocab_size=64, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # 2 s window
TINY_W2V = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=8)


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(round(seconds * SR))) * 0.2).astype(np.float32)


@pytest.fixture(scope="module")
def whisper() -> WhisperAudioEncoder:
    return WhisperAudioEncoder(None, random_config=TINY_WHISPER, window=2)


def _window_sample(builder: SampleBuilder, raw: dict, contains: int | None = None, window: int = 1) -> tuple[dict, int]:
    """A training sample (random window, as in training) and its first source frame; with ``contains``, the first
    seeded draw whose window holds that frame."""
    for seed in range(200):
        s = builder.build(raw, np.random.default_rng(seed))
        start = decode_index(s["video"][0])  # the source frame index is drawn in the frames' grey level
        if contains is None or start <= contains < start + window:
            return s, start
    raise AssertionError("no window drawn around the frame")


def _frame_features(encoder, sample: dict, frame: int) -> torch.Tensor:
    batch = collate_samples([sample])
    n = batch["audio"].shape[1] * FPS / SR
    if "audio_context" in batch:
        feats = encoder(batch["audio_context"], num_frames=round(n), fps=FPS, offsets=batch["audio_context_offset"],
                        lengths=batch["audio_context_length"])
    else:
        feats = encoder(batch["audio"], num_frames=round(n), fps=FPS)
    return feats[0, frame]


def _builders(context):
    kw = dict(height=32, width=32, audio_context=context)
    return SampleBuilder(ClipConfig(num_frames=12, **kw)), SampleBuilder(ClipConfig(num_frames=1, **kw))


def test_frame_features_do_not_depend_on_the_window(whisper):
    raw = make_sample("talk", num_frames=CLIP, audio=_speech(CLIP / FPS, 0))
    b12, b1 = _builders("clip")
    s12, start = _window_sample(b12, raw)
    frame = start + 7
    s1, _ = _window_sample(b1, raw, contains=frame)
    ctx = s12["audio_context"]
    assert ctx.shape[0] == round(CLIP / FPS * SR)  # the clip's whole audio...
    off = int(s12["audio_context_offset"])
    assert torch.equal(ctx[off:off + s12["audio"].shape[0]], s12["audio"])  # ...with the window where it says
    inside12 = _frame_features(whisper, s12, frame - start)
    alone = _frame_features(whisper, s1, 0)
    torch.testing.assert_close(alone, inside12, atol=1e-5, rtol=1e-5)

    # without a context (the old behaviour) a 1-frame window hears 40 ms and its features differ
    n12, n1 = _builders(None)
    w12, start_n = _window_sample(n12, raw)
    assert "audio_context" not in w12
    w1 = n1.build(raw, None)  # validation window: frame 0
    w12_at0 = n12.build(raw, None)
    assert not torch.allclose(_frame_features(whisper, w1, 0), _frame_features(whisper, w12_at0, 0), atol=1e-3)


@pytest.mark.parametrize("context", ["clip", [0.2, 0.1]])
def test_audio_150ms_before_a_frame_changes_its_features(context):
    # a window of 8 50-Hz steps each side (160 ms) reaches the click; attention carries it further, weakly
    whisper = WhisperAudioEncoder(None, random_config=TINY_WHISPER, window=8)
    audio = _speech(CLIP / FPS, 1)
    frame = 20
    changed = audio.copy()
    t = int(round((frame / FPS - 0.15) * SR))
    changed[t - 80:t + 80] = 0.9 * np.sign(np.sin(np.arange(160)))  # a click 150 ms before the frame
    _, b1 = _builders(context)
    feats = []
    for a in (audio, changed):
        s, _ = _window_sample(b1, make_sample("talk", num_frames=CLIP, audio=a), contains=frame)
        if context != "clip":
            assert s["audio_context"].shape[0] == round((0.2 + 1 / FPS + 0.1) * SR)
        feats.append(_frame_features(whisper, s, 0))
    assert (feats[0] - feats[1]).abs().max() > 1e-3


def test_padded_batch_matches_each_context_alone():
    """Contexts of different clip lengths are zero-padded in a batch; wav2vec2 normalises over its input, so each
    sample is encoded at its own length and gets the features it would get alone."""
    w2v = Wav2Vec2AudioEncoder(None, random_config=TINY_W2V, window=1)
    builder = SampleBuilder(ClipConfig(num_frames=4, height=32, width=32))
    samples = [builder.build(make_sample(f"c{n}", num_frames=n, audio=_speech(n / FPS, n)), None) for n in (12, 20)]
    batch = collate_samples(samples)
    assert batch["audio_context"].shape == (2, round(20 / FPS * SR))
    assert batch["audio_context_length"].tolist() == [round(12 / FPS * SR), round(20 / FPS * SR)]
    both = w2v(batch["audio_context"], 4, FPS, offsets=batch["audio_context_offset"],
               lengths=batch["audio_context_length"])
    for i, s in enumerate(samples):
        one = collate_samples([s])
        alone = w2v(one["audio_context"], 4, FPS, offsets=one["audio_context_offset"],
                    lengths=one["audio_context_length"])
        torch.testing.assert_close(both[i], alone[0], atol=1e-5, rtol=1e-5)
