"""EchoMimicV2's released Whisper features (parity issue §2): OpenAI-format ``tiny.pt`` and a transformers directory
holding the same weights give the same features, and those are the release's arithmetic (whole-input log-mel, 30 s
mel segments, the embedding + every block output before ``ln_post``, ``int(i * 50 / fps)`` and steps ``[c - 4, c + 6)``,
50 tokens per frame), re-implemented independently below from the official ``audio2feature.py`` / ``model.py`` /
``audio.py`` / ``transcribe.py``, to 1e-4.

The checkpoint is tiny and random (d 16, 4 layers as whisper-tiny, 80 mels, 1 s segments) in the release's file format:
``torch.save({"dims": ..., "model_state_dict": ...})`` with OpenAI's key names, float16 as OpenAI saves them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from halfbody.models.audio_encoders import WhisperAudioEncoder, frame_window_indices
from halfbody.models.pretrained import PretrainedNotFoundError
from halfbody.models.whisper_openai import (convert_to_transformers_dir, openai_to_transformers,
                                            save_openai_checkpoint, transformers_to_openai)
from halfbody.utils.errors import UserError

SR = 16000
DIMS = dict(n_mels=80, n_audio_ctx=50, n_audio_state=16, n_audio_head=2, n_audio_layer=4, n_vocab=64, n_text_ctx=8,
            n_text_state=16, n_text_head=2, n_text_layer=1)  # 50 positions: 1 s segments (100 mel frames)
RELEASE = dict(window=[4, 5], centring="floor", layers="blocks", layer_layout="tokens", mel="release")


# ----------------------------------------------------------------------------------------------- the checkpoint
def _openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with OpenAI Whisper's key names and shapes (``whisper/model.py``), float16."""
    g = torch.Generator().manual_seed(seed)
    d, m, n = DIMS["n_audio_state"], DIMS["n_mels"], 4 * DIMS["n_audio_state"]

    def w(*shape, fan_in=None):
        return torch.randn(*shape, generator=g) / math.sqrt(fan_in or shape[-1])

    def ln(prefix):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(d, generator=g), f"{prefix}.bias": 0.1 * torch.randn(d, generator=g)}

    def attn(prefix):
        return {f"{prefix}.query.weight": w(d, d), f"{prefix}.query.bias": 0.1 * w(d, fan_in=1),
                f"{prefix}.key.weight": w(d, d),  # no key bias in Whisper
                f"{prefix}.value.weight": w(d, d), f"{prefix}.value.bias": 0.1 * w(d, fan_in=1),
                f"{prefix}.out.weight": w(d, d), f"{prefix}.out.bias": 0.1 * w(d, fan_in=1)}

    def block(prefix, cross):
        sd = {**attn(f"{prefix}.attn"), **ln(f"{prefix}.attn_ln"), **ln(f"{prefix}.mlp_ln"),
              f"{prefix}.mlp.0.weight": w(n, d), f"{prefix}.mlp.0.bias": 0.1 * w(n, fan_in=1),
              f"{prefix}.mlp.2.weight": w(d, n), f"{prefix}.mlp.2.bias": 0.1 * w(d, fan_in=1)}
        if cross:
            sd.update({**attn(f"{prefix}.cross_attn"), **ln(f"{prefix}.cross_attn_ln")})
        return sd

    sd = {"encoder.conv1.weight": w(d, m, 3, fan_in=3 * m), "encoder.conv1.bias": 0.1 * w(d, fan_in=1),
          "encoder.conv2.weight": w(d, d, 3, fan_in=3 * d), "encoder.conv2.bias": 0.1 * w(d, fan_in=1),
          "encoder.positional_embedding": w(DIMS["n_audio_ctx"], d, fan_in=1), **ln("encoder.ln_post"),
          "decoder.token_embedding.weight": w(DIMS["n_vocab"], d), "decoder.positional_embedding": w(DIMS["n_text_ctx"], d),
          **ln("decoder.ln")}
    for i in range(DIMS["n_audio_layer"]):
        sd.update(block(f"encoder.blocks.{i}", cross=False))
    for i in range(DIMS["n_text_layer"]):
        sd.update(block(f"decoder.blocks.{i}", cross=True))
    return {k: v.half() for k, v in sd.items()}


def _hf_name(k: str) -> str:
    """OpenAI -> transformers names, spelled out here independently of halfbody.models.whisper_openai."""
    whole = {"encoder.positional_embedding": "encoder.embed_positions.weight",
             "decoder.positional_embedding": "decoder.embed_positions.weight",
             "decoder.token_embedding.weight": "decoder.embed_tokens.weight"}
    if k in whole:
        return whole[k]
    for a, b in ((".blocks.", ".layers."), (".cross_attn_ln.", ".encoder_attn_layer_norm."),
                 (".cross_attn.", ".encoder_attn."), (".attn_ln.", ".self_attn_layer_norm."), (".attn.", ".self_attn."),
                 (".query.", ".q_proj."), (".key.", ".k_proj."), (".value.", ".v_proj."), (".out.", ".out_proj."),
                 (".mlp_ln.", ".final_layer_norm."), (".mlp.0.", ".fc1."), (".mlp.2.", ".fc2."),
                 ("encoder.ln_post.", "encoder.layer_norm."), ("decoder.ln.", "decoder.layer_norm.")):
        k = k.replace(a, b)
    return k


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """``audio_processor/tiny.pt`` (OpenAI format) and ``whisper-tiny/`` (transformers) holding the same weights."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    root = tmp_path_factory.mktemp("release")
    sd = _openai_state_dict()
    pt = root / "audio_processor" / "tiny.pt"
    pt.parent.mkdir()
    torch.save({"dims": dict(DIMS), "model_state_dict": sd}, pt)
    d = DIMS["n_audio_state"]
    model = WhisperModel(WhisperConfig(
        vocab_size=DIMS["n_vocab"], num_mel_bins=DIMS["n_mels"], d_model=d, encoder_layers=DIMS["n_audio_layer"],
        encoder_attention_heads=DIMS["n_audio_head"], encoder_ffn_dim=4 * d, decoder_layers=DIMS["n_text_layer"],
        decoder_attention_heads=DIMS["n_text_head"], decoder_ffn_dim=4 * d, max_source_positions=DIMS["n_audio_ctx"],
        max_target_positions=DIMS["n_text_ctx"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))
    model.load_state_dict({_hf_name(k): v.float() for k, v in sd.items()}, strict=True)
    model.save_pretrained(root / "whisper-tiny")
    WhisperFeatureExtractor(feature_size=DIMS["n_mels"], chunk_length=1).save_pretrained(root / "whisper-tiny")
    return {"pt": pt, "dir": root / "whisper-tiny", "sd": sd, "model": model}


# ----------------------------------------------------------------------------------------------- the release, re-done
def _slaney_mel_filters(n_mels: int = 80, n_fft: int = 400, sr: int = SR) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) (Slaney scale and area normalisation): the release's mel_filters.npz."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_f = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    ramps = mel_f[:, None] - fft_f[None, :]
    lower = -ramps[:-2] / np.diff(mel_f)[:-1, None]
    upper = ramps[2:] / np.diff(mel_f)[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


def _release_log_mel(audio: np.ndarray) -> torch.Tensor:
    """audio.py ``log_mel_spectrogram``: whole-input STFT, last frame dropped, floor at the input's max - 8."""
    x = torch.from_numpy(audio)
    stft = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[:, :-1].abs() ** 2
    log = (torch.from_numpy(_slaney_mel_filters()) @ power).clamp(min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


def _release_encoder(sd: dict[str, torch.Tensor], mel: torch.Tensor) -> np.ndarray:
    """model.py ``AudioEncoder.forward(include_embeddings=True)`` in OpenAI's key layout: ``(1, L, P, d)``, the
    embedding and each block's output, none through ``ln_post``."""
    p = {k: v.float() for k, v in sd.items() if k.startswith("encoder.")}
    heads = DIMS["n_audio_head"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])

    def lin(x, name, bias=True):
        return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None)

    x = F.gelu(F.conv1d(mel[None], p["encoder.conv1.weight"], p["encoder.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, p["encoder.conv2.weight"], p["encoder.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1) + p["encoder.positional_embedding"]
    states = [x]
    for i in range(DIMS["n_audio_layer"]):
        b = f"encoder.blocks.{i}"
        h = ln(x, f"{b}.attn_ln")
        q, k, v = lin(h, f"{b}.attn.query"), lin(h, f"{b}.attn.key", bias=False), lin(h, f"{b}.attn.value")
        n, t, d = q.shape
        scale = (d // heads) ** -0.25
        q = q.view(n, t, heads, -1).permute(0, 2, 1, 3) * scale
        k = k.view(n, t, heads, -1).permute(0, 2, 3, 1) * scale
        v = v.view(n, t, heads, -1).permute(0, 2, 1, 3)
        att = (torch.softmax(q @ k, dim=-1) @ v).permute(0, 2, 1, 3).flatten(2)
        x = x + lin(att, f"{b}.attn.out")
        h = ln(x, f"{b}.mlp_ln")
        x = x + lin(F.gelu(lin(h, f"{b}.mlp.0")), f"{b}.mlp.2")
        states.append(x)
    return torch.stack(states, dim=1).numpy()


def _release_audio2feat(sd, audio: np.ndarray) -> np.ndarray:
    """transcribe.py's 30 s (here 1 s) segment loop + audio2feature.py ``audio2feat``: ``(T, L, d)``."""
    mel = _release_log_mel(audio)
    seg = 2 * DIMS["n_audio_ctx"]
    embeds, seek = [], 0
    while seek < mel.shape[-1]:
        end = min(seek + seg, mel.shape[-1])
        segment = F.pad(mel[:, seek:seek + seg], (0, seg - mel[:, seek:seek + seg].shape[-1]))  # pad_or_trim
        e = _release_encoder(sd, segment).transpose(0, 2, 1, 3).squeeze(0)
        embeds.append(e[: int((end - seek) / 2)])
        seek += seg
    return np.concatenate(embeds, axis=0)


def _release_frame(features: np.ndarray, i: int, fps: float) -> np.ndarray:
    """audio2feature.py ``get_sliced_feature(audio_feat_length=[2, 2])``: ``(50, d)`` for whisper-tiny."""
    centre = int(i * 50 / fps)
    idx = [min(max(j, 0), len(features) - 1) for j in range(centre - 2 * 2, centre + (2 + 1) * 2)]
    return np.concatenate([features[j] for j in idx], axis=0).reshape(-1, DIMS["n_audio_state"])


def _speech(samples: int, seed: int) -> np.ndarray:
    """Noise bursts with a silent gap (the log-mel floor, max - 8, acts there) and a loud stretch."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(samples) * 0.05).astype(np.float32)
    x[samples // 4: samples // 4 + 4000] = 0.0
    x[samples // 2: samples // 2 + 3000] *= 10
    return x


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fps", [25.0, 30.0])
def test_openai_and_transformers_weights_give_the_release_features(release_files, fps):
    audio = _speech(36950, seed=int(fps))  # 2.3 s: 230 mel frames, 3 segments (the last partial), 115 steps
    from_pt = WhisperAudioEncoder(release_files["pt"], **RELEASE)
    from_dir = WhisperAudioEncoder(release_files["dir"], **RELEASE)
    num_frames = math.ceil(audio.shape[0] / SR * fps) + 2  # past the end: clamped to the last step
    with torch.no_grad():
        a = from_pt(torch.from_numpy(audio)[None], num_frames, fps)
        b = from_dir(torch.from_numpy(audio)[None], num_frames, fps)
        seq = from_pt.sequence_features(torch.from_numpy(audio)[None])
    assert a.shape == (1, num_frames, 50, 16) and (from_pt.tokens_per_frame, from_pt.feature_dim) == (50, 16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = _release_audio2feat(release_files["sd"], audio)
    assert ref.shape == (115, 5, 16) and seq.shape == (1, 115, 5, 16)  # floor(S / 320), not ceil
    np.testing.assert_allclose(seq[0].numpy(), ref, atol=1e-4, rtol=1e-4)
    for i in range(num_frames):
        np.testing.assert_allclose(a[0, i].numpy(), _release_frame(ref, i, fps), atol=1e-4, rtol=1e-4)


def test_release_variant_differs_where_the_release_differs(release_files):
    """Each release setting matters: the last state before ln_post, the whole-input mel, the window."""
    audio = torch.from_numpy(_speech(36950, seed=3))[None]
    rel = WhisperAudioEncoder(release_files["pt"], **RELEASE)
    post_ln = WhisperAudioEncoder(release_files["pt"], **{**RELEASE, "layers": "all"})
    per_window = WhisperAudioEncoder(release_files["dir"], **{**RELEASE, "mel": "transformers"})
    with torch.no_grad():
        s_rel, s_all, s_win = (e.sequence_features(audio) for e in (rel, post_ln, per_window))
    torch.testing.assert_close(s_rel[:, :, :4], s_all[:, :, :4])  # embedding and blocks 1..3 agree
    assert (s_rel[:, :, 4] - s_all[:, :, 4]).abs().max() > 0.1  # transformers' last state is after ln_post
    assert s_win.shape[1] == 116 and (s_rel - s_win[:, :115]).abs().max() > 1e-2  # per-window mel, ceil steps
    assert rel.identity != post_ln.identity != per_window.identity
    assert rel.identity.startswith("whisper-tiny-") and "w4_5-floor-tokens" in rel.identity and "." not in rel.identity


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97, 24.0, 12.5])
def test_asymmetric_floor_window_is_the_release_slice(fps):
    n, steps = 40, 70
    got = frame_window_indices(n, fps, [4, 5], steps, centring="floor")
    want = [[min(max(j, 0), steps - 1) for j in range(int(i * 50 / fps) - 4, int(i * 50 / fps) + 6)] for i in range(n)]
    assert got.tolist() == want
    # an audio-context offset moves frame 0 to ``start_step``; centres stay floor(start + i * 50 / fps)
    shifted = frame_window_indices(n, fps, [4, 5], 500, centring="floor", start_step=100.0)
    assert shifted[:, 4].tolist() == [100 + int(i * 50 / fps) for i in range(n)]
    if fps == 30.0:  # 1.67 steps: the project's rounding centres frame 1 on step 2, the release on step 1
        assert frame_window_indices(2, fps, 2, steps)[1, 2] == 2 and got[1, 4] == 1


def test_tokens_are_step_major_and_context_offsets_slice_the_same_frames(release_files):
    enc = WhisperAudioEncoder(release_files["pt"], **RELEASE)
    fps, total = 25.0, 40
    audio = torch.from_numpy(_speech(int(total / fps * SR), seed=5))[None]
    with torch.no_grad():
        seq = enc.sequence_features(audio)
        full = enc(audio, total, fps)
        # a 6-frame training window at frame 17 of the clip, its context being the whole clip (data.audio_context)
        start, n = 17, 6
        offsets = torch.tensor([round(start / fps * SR)])
        window = enc(audio, n, fps, offsets=offsets, lengths=torch.tensor([audio.shape[1]]))
    torch.testing.assert_close(window[0], full[0, start:start + n], atol=0, rtol=0)
    # contexts of different lengths zero-padded in one batch: the release's whole-input log-mel floor is not
    # padding-invariant, so each sample is encoded at its own length and gets its features alone
    short = audio[:, : audio.shape[1] // 2]
    with torch.no_grad():
        both = enc(torch.cat([audio, F.pad(short, (0, audio.shape[1] - short.shape[1]))]), n, fps,
                   offsets=offsets.repeat(2), lengths=torch.tensor([audio.shape[1], short.shape[1]]))
        alone = enc(short, n, fps, offsets=offsets)
    torch.testing.assert_close(both[1], alone[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[0], window[0], atol=1e-6, rtol=1e-6)
    i = 21
    c = int(i * 50 / fps)
    for t in range(50):  # token t = (step c - 4 + t // 5, state t % 5)
        torch.testing.assert_close(full[0, i, t], seq[0, c - 4 + t // 5, t % 5])


def test_conversions_round_trip(release_files, tmp_path):
    sd, model = release_files["sd"], release_files["model"]
    hf = openai_to_transformers(sd, DIMS)
    assert set(hf) == set(model.state_dict()) and all(torch.equal(hf[k].float(), model.state_dict()[k]) for k in hf)
    back = transformers_to_openai(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # OpenAI file -> transformers directory -> OpenAI file: the same tensors (float16 as released)
    out = convert_to_transformers_dir(release_files["pt"], tmp_path / "converted")
    from transformers import WhisperModel

    again = save_openai_checkpoint(WhisperModel.from_pretrained(out), tmp_path / "again" / "tiny.pt")
    reread = torch.load(again, weights_only=True)
    assert reread["dims"] == DIMS and all(torch.equal(reread["model_state_dict"][k], sd[k]) for k in sd)
    assert not list((tmp_path / "again").glob(".*"))  # no temporaries left
    with pytest.raises(UserError, match="exists"):
        convert_to_transformers_dir(release_files["pt"], out)
    # the command line: one line and exit code 2 for a missing file
    from halfbody.models.whisper_openai import main

    assert main([str(release_files["pt"]), str(tmp_path / "cli")]) == 0 and (tmp_path / "cli" / "config.json").exists()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "absent.pt"), str(tmp_path / "cli2")])
    assert e.value.code == 2 and not (tmp_path / "cli2").exists()


def _bad(path, payload):
    torch.save(payload, path)
    return path


def test_bad_checkpoints_name_the_file_and_key(release_files, tmp_path):
    sd, key = release_files["sd"], "model.audio_encoder.path"

    def error(path, exc=UserError) -> str:
        with pytest.raises(exc) as e:
            WhisperAudioEncoder(path, key=key, **RELEASE)
        msg = str(e.value)
        assert "\n" not in msg and key in msg and str(path) in msg
        return msg

    missing = dict(sd)
    del missing["encoder.blocks.2.mlp_ln.weight"]
    assert "missing ['encoder.blocks.2.mlp_ln.weight']" in error(_bad(tmp_path / "m.pt", {"dims": DIMS,
                                                                                          "model_state_dict": missing}))
    shaped = {**sd, "encoder.blocks.0.attn.query.weight": torch.zeros(16, 8, dtype=torch.float16)}
    msg = error(_bad(tmp_path / "s.pt", {"dims": DIMS, "model_state_dict": shaped}))
    assert "mis-shaped ['encoder.blocks.0.attn.query.weight (16, 8) != (16, 16)']" in msg
    extra = {**sd, "encoder.blocks.0.attn.key.bias": torch.zeros(16, dtype=torch.float16)}
    assert "unexpected ['encoder.blocks.0.attn.key.bias']" in error(_bad(tmp_path / "u.pt", {"dims": DIMS,
                                                                                            "model_state_dict": extra}))
    assert "'dims'" in error(_bad(tmp_path / "d.pt", {"dims": {**DIMS, "n_mels": None}, "model_state_dict": sd}))
    assert "'model_state_dict'" in error(_bad(tmp_path / "sd.pt", sd))  # a bare state dict
    cut = tmp_path / "cut.pt"
    cut.write_bytes(release_files["pt"].read_bytes()[:2000])
    assert "not a loadable Whisper checkpoint" in error(cut)
    with pytest.raises(PretrainedNotFoundError, match=f"{key}.*not a directory.*tiny.pt"):
        WhisperAudioEncoder(tmp_path / "absent" / "tiny.pt", key=key, **RELEASE)


def test_release_config_builds_the_release_variant(release_files):
    """conf/model/audio_encoder/whisper_tiny_release.yaml (read alone: the group's file, as Hydra would use it)."""
    import hydra
    from omegaconf import OmegaConf

    from halfbody.utils.hydra import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "model" / "audio_encoder" / "whisper_tiny_release.yaml")
    assert OmegaConf.to_container(cfg)["path"] == "${paths.pretrained_dir}/EchoMimicV2/audio_processor/tiny.pt"
    for path in (release_files["pt"], release_files["dir"]):
        cfg.path = str(path)
        enc = hydra.utils.instantiate(cfg)
        assert (enc.window_before, enc.window_after, enc.centring, enc.layers, enc.mel) == (4, 5, "floor", "blocks",
                                                                                           "release")
        assert (enc.tokens_per_frame, enc.feature_dim, enc.layer_layout) == (50, 16, "tokens")
    tiny = hydra.utils.instantiate(OmegaConf.load(CONFIG_DIR / "model" / "audio_encoder"
                                                  / "whisper_random_tiny_release.yaml"))
    assert (tiny.tokens_per_frame, tiny.feature_dim, tiny.mel, tiny.layers, tiny.centring) == (30, 64, "release",
                                                                                                "blocks", "floor")
