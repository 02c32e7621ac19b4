"""Frozen audio encoders that turn 16 kHz speech into per-video-frame feature windows.

Interface (docs/ARCHITECTURE.md, "Audio encoder interface"):

    forward(audio (B, S) float at 16 kHz, num_frames: int, fps: float) -> (B, F, K, D)

Both encoders first compute a 50 Hz sequence of hidden states from several layers,
``sequence_features(audio) -> (B, T50, L, d)`` with ``T50 = ceil(S / 320)``, then cut, for each video frame ``i``, the
window of ``2 * window + 1`` 50-Hz steps centred on step ``c_i = floor(i / fps * 50 + 0.5)`` (round half up), with
indices clamped to ``[0, T50 - 1]`` (edge replication). This is EchoMimic(V2)'s per-frame Whisper window
(its official code centres on ``int(i * 50 / fps)`` and takes 10 steps; here the window is symmetric, so ``K`` is odd).

Layers are arranged by ``layer_layout``:

- ``"concat"`` (default): layers concatenated along the feature axis, ``K = 2w + 1``, ``D = L * d``
  (whisper-tiny, all 5 hidden states: ``D = 1920``);
- ``"tokens"``: every (step, layer) pair is a token, ``K = (2w + 1) * L``, ``D = d`` (the layout of EchoMimic's
  official whisper chunks, e.g. ``(F, 50, 384)``).

``identity`` names the encoder, checkpoint fingerprint and windowing settings, using only ``[A-Za-z0-9_-]`` (webdataset
field names split at the first dot), so cached features written under one identity are never read under another.

MirrorMe (§3.3) feeds the whole wav2vec2 50 Hz sequence to its causal audio encoder: use :meth:`sequence_features`.
"""

from __future__ import annotations

import abc

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
import torch.nn.functional as Fn

from halfbody.models.pretrained import load_pretrained
from halfbody.utils.containers import to_plain

__all__ = ["AudioEncoder", "WhisperAudioEncoder", "Wav2Vec2AudioEncoder", "frame_window_indices",
           "checkpoint_fingerprint"]

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # Hz, the common rate of the sequence features
SAMPLES_PER_STEP = SAMPLE_RATE // FEATURE_RATE  # 320


def frame_window_indices(num_frames: int, fps: float, window: int, num_steps: int,
                         feature_rate: float = FEATURE_RATE, device: torch.device | str | None = None,
                         start_step: float = 0.0) -> torch.Tensor:
    """Indices ``(F, 2w + 1)`` into a ``num_steps``-long feature sequence at ``feature_rate`` Hz.

    Row ``i`` is ``c_i - w, ..., c_i + w`` with ``c_i = floor(start_step + i / fps * feature_rate + 0.5)``, clamped to
    the sequence; ``start_step`` is where frame 0 lies in the sequence (the window's offset in an audio context).
    """
    if num_frames < 1 or fps <= 0 or window < 0 or num_steps < 1:
        raise ValueError(f"need num_frames >= 1, fps > 0, window >= 0, num_steps >= 1; got {num_frames}, {fps}, "
                         f"{window}, {num_steps}")
    t = start_step + torch.arange(num_frames, dtype=torch.float64) * (feature_rate / fps)
    centres = torch.floor(t + 0.5).long()
    idx = centres[:, None] + torch.arange(-window, window + 1)[None, :]
    return idx.clamp_(0, num_steps - 1).to(device)


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short hex fingerprint of a local checkpoint directory.

    Hashes the JSON configs in full and, for each weight file, its name, size and 256 evenly spaced 64 KiB blocks
    (about 16 MiB read per file, so it stays fast for large checkpoints yet changes with any substantial fine-tune).
    """
    p = Path(path)
    h = hashlib.sha1()
    for f in sorted(p.glob("*.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    block, blocks = 1 << 16, 256
    for f in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for k in range(blocks):
                fh.seek((size - block) * k // (blocks - 1) if size > block else 0)
                h.update(fh.read(block))
                if size <= block:
                    break
    return h.hexdigest()[:10]


def _config_fingerprint(config: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"config": config, "seed": seed}, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-") or "x"


class AudioEncoder(nn.Module, metaclass=abc.ABCMeta):
    """Interface: ``forward(audio (B, S) at 16 kHz, num_frames, fps) -> (B, F, K, D)``; frozen by default.

    Subclasses set ``num_layers`` (``L``) and ``hidden_size`` (``d``) and implement :meth:`sequence_features`;
    the per-frame windowing, layer layout and freezing live here.

    Args:
        window: ``w``, 50-Hz steps on each side of a frame's centre step.
        layer_layout: ``"concat"`` or ``"tokens"`` (see the module docstring).
        frozen: no grads and eval mode even when a parent calls ``.train()`` (default).
    """

    num_layers: int
    hidden_size: int
    identity: str
    # True when zeros appended to the audio leave the features of the samples before them unchanged (a batch of
    # zero-padded contexts can then be encoded at once)
    padding_invariant: bool = False
    sample_rate: int = SAMPLE_RATE
    feature_rate: int = FEATURE_RATE

    def __init__(self, window: int = 2, layer_layout: Literal["concat", "tokens"] = "concat",
                 frozen: bool = True) -> None:
        super().__init__()
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if layer_layout not in ("concat", "tokens"):
            raise ValueError(f"layer_layout must be 'concat' or 'tokens', got {layer_layout!r}")
        self.window = int(window)
        self.layer_layout = layer_layout
        self.frozen = frozen

    @property
    def feature_dim(self) -> int:
        """``D``."""
        return self.hidden_size * self.num_layers if self.layer_layout == "concat" else self.hidden_size

    @property
    def tokens_per_frame(self) -> int:
        """``K``."""
        k = 2 * self.window + 1
        return k if self.layer_layout == "concat" else k * self.num_layers

    def freeze(self) -> "AudioEncoder":
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "AudioEncoder":
        # frozen encoders stay in eval (no dropout, no wav2vec2 time masking) when Lightning calls .train()
        return super().train(False if self.frozen else mode)

    @staticmethod
    def num_steps(num_samples: int) -> int:
        """``T50 = ceil(S / 320)``: 50-Hz steps covering ``num_samples`` samples at 16 kHz (at least 1)."""
        return max(1, math.ceil(num_samples / SAMPLES_PER_STEP))

    def _identity(self, family: str, checkpoint: str, fingerprint: str, extra: str = "") -> str:
        parts = [family, _safe(checkpoint), fingerprint, extra, f"w{self.window}", self.layer_layout]
        return "-".join(p for p in parts if p)

    @staticmethod
    def _check_audio(audio: torch.Tensor) -> None:
        if audio.ndim != 2:
            raise ValueError(f"audio must be (B, S) mono 16 kHz, got shape {tuple(audio.shape)}")
        if audio.shape[1] < 1:
            raise ValueError("audio must have at least one sample")

    @abc.abstractmethod
    def sequence_features(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` at 16 kHz -> ``(B, T50, L, d)`` hidden states at 50 Hz, ``T50 = ceil(S / 320)``."""

    def windows(self, seq: torch.Tensor, num_frames: int, fps: float, start_steps: torch.Tensor | None = None,
                valid_steps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame windows of a 50 Hz sequence: ``(B, T50, L, d)`` -> ``(B, F, K, D)`` in ``layer_layout``.

        ``start_steps`` ``(B,)``: where each sample's frame 0 lies in its sequence (default 0); ``valid_steps``
        ``(B,)``: each sample's own length (windows are clamped to it; default ``T50``).
        """
        if seq.ndim != 4:
            raise ValueError(f"seq must be (B, T50, L, d), got shape {tuple(seq.shape)}")
        b, t, l, d = seq.shape
        if start_steps is None and valid_steps is None:
            idx = frame_window_indices(num_frames, fps, self.window, t, self.feature_rate, device=seq.device)
            idx = idx.expand(b, -1, -1)
        else:
            starts = [0.0] * b if start_steps is None else [float(v) for v in start_steps]
            valid = [t] * b if valid_steps is None else [min(int(v), t) for v in valid_steps]
            idx = torch.stack([frame_window_indices(num_frames, fps, self.window, valid[i], self.feature_rate,
                                                    device=seq.device, start_step=starts[i]) for i in range(b)])
        k = idx.shape[-1]
        w = seq[torch.arange(b, device=seq.device)[:, None], idx.reshape(b, -1)]  # (B, F * (2w+1), L, d)
        if self.layer_layout == "concat":
            return w.reshape(b, num_frames, k, l * d)
        return w.reshape(b, num_frames, k * l, d)

    def context_features(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S)`` zero-padded audio of per-sample ``lengths`` -> ``(B, T50, L, d)``: each sample's features as if
        encoded alone (batched when trailing zeros cannot change the features, ``padding_invariant``)."""
        if lengths is None or self.padding_invariant or bool((lengths == audio.shape[1]).all()):
            return self.sequence_features(audio)
        seqs = [self.sequence_features(audio[i : i + 1, : int(n)])[0] for i, n in enumerate(lengths)]
        return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)

    def forward(self, audio: torch.Tensor, num_frames: int, fps: float, offsets: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S)`` 16 kHz audio -> ``(B, num_frames, K, D)`` windows of 50 Hz features.

        With an audio context (EchoMimicV2 parity issue §1), ``audio`` holds more than the frames: ``offsets`` ``(B,)``
        is each sample's first frame in samples, ``lengths`` ``(B,)`` its unpadded length. The encoder runs on the
        whole context and each frame's window is sliced from it, so a frame hears the speech around it whatever
        the training window.
        """
        seq = self.context_features(audio, lengths)
        if offsets is None and lengths is None:
            return self.windows(seq, num_frames, fps)
        starts = None if offsets is None else offsets.double().cpu() / SAMPLES_PER_STEP
        valid = None if lengths is None else [self.num_steps(int(n)) for n in lengths]
        return self.windows(seq, num_frames, fps, starts, valid)


# --------------------------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------------------------

_WHISPER_EXPECTED = ("a transformers Whisper directory (config.json + model.safetensors, optionally "
                     "preprocessor_config.json), e.g. openai/whisper-tiny")


def _build_model(model_cls, config_cls, path, key: str, expected: str, layers: str,
                 random_config: dict[str, Any] | None, seed: int, dtype: torch.dtype | None):
    """A transformers model from the local directory ``path`` (config key ``key``), or seeded random weights from
    ``random_config`` when ``path`` is None. Returns ``(model, directory or None, checkpoint name, fingerprint)``."""
    if layers not in ("all", "last"):
        raise ValueError(f"layers must be 'all' or 'last', got {layers!r}")
    if path is None and random_config is not None:
        random_config = to_plain(random_config)  # Hydra hands ListConfig values, which transformers configs reject
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config_cls(**random_config))
        return model, None, "random", f"s{seed}-{_config_fingerprint(random_config, seed)}"
    model = load_pretrained(model_cls, path, key, expected, **_dtype_kwargs(dtype))
    d = Path(os.path.expanduser(str(path)))
    return model, d, d.name, checkpoint_fingerprint(d)


class WhisperAudioEncoder(AudioEncoder):
    """Whisper encoder hidden states of all layers at 50 Hz, windowed per video frame (EchoMimicV2 with whisper-tiny).

    ``sequence_features`` returns the embedding output and every layer's output as transformers gives them
    (``output_hidden_states``: embedding, layers 1..N-1, then the final layer after the encoder's last LayerNorm), so
    ``L = encoder_layers + 1`` (5 for whisper-tiny, ``d = 384``). With ``layers="last"`` only the final one (``L = 1``).

    Log-mel features come from the ``WhisperFeatureExtractor`` saved in the same directory
    (``preprocessor_config.json``); when there is none, one is built with the model's ``num_mel_bins`` and Whisper's
    defaults (16 kHz, hop 160, n_fft 400). The encoder needs exactly ``2 * max_source_positions`` mel frames
    (30 s for released checkpoints): each clip is zero-padded to that window and the outputs are sliced back to the
    clip; a longer clip is cut into consecutive windows encoded independently and concatenated.

    Args:
        path: local Whisper directory (the value of config key ``key``), or ``None`` with ``random_config``.
        key: the config key naming ``path``, quoted in loading errors.
        window: ``w``; ``K = 2w + 1`` (``"concat"``).
        layers: ``"all"`` hidden states or only the ``"last"``.
        layer_layout: ``"concat"`` or ``"tokens"``.
        random_config: ``WhisperConfig`` kwargs for a randomly initialised encoder (tiny CPU presets), used only when
            ``path`` is ``None``; weights are drawn under ``torch.manual_seed(seed)``.
        seed: see ``random_config``.
        dtype: optional dtype to load the model in (features are returned as float32).
        frozen: no grads and eval mode (default).
    """

    # each 30 s window is zero-padded by Whisper itself, so trailing zeros change nothing before them
    padding_invariant = True

    def __init__(self, path: str | os.PathLike | None = None, key: str = "model.audio_encoder.path", window: int = 2,
                 layers: Literal["all", "last"] = "all", layer_layout: Literal["concat", "tokens"] = "concat",
                 random_config: dict[str, Any] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                 frozen: bool = True) -> None:
        super().__init__(window=window, layer_layout=layer_layout, frozen=frozen)
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

        model, fe_dir, checkpoint, fingerprint = _build_model(WhisperModel, WhisperConfig, path, key, _WHISPER_EXPECTED,
                                                              layers, random_config, seed, dtype)
        self.encoder = model.get_encoder()  # the decoder is dropped with ``model``
        cfg = self.encoder.config
        if fe_dir is not None and (fe_dir / "preprocessor_config.json").exists():
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(fe_dir), local_files_only=True)
        else:
            self.feature_extractor = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=SAMPLE_RATE)
        fe = self.feature_extractor
        if fe.sampling_rate != SAMPLE_RATE or fe.feature_size != cfg.num_mel_bins:
            raise ValueError(f"Whisper feature extractor ({fe.feature_size} mels at {fe.sampling_rate} Hz) does not "
                             f"match the model ({cfg.num_mel_bins} mels at {SAMPLE_RATE} Hz) in {path}")
        stride = self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
        if fe.hop_length * stride != SAMPLES_PER_STEP:
            raise ValueError(f"Whisper hop_length {fe.hop_length} x conv stride {stride} must be {SAMPLES_PER_STEP} "
                             f"samples (50 Hz outputs)")
        self.mel_frames = cfg.max_source_positions * stride  # the encoder's fixed input length
        self.window_samples = self.mel_frames * fe.hop_length  # 480000 (30 s) for released checkpoints
        self.layers = layers
        self.hidden_size = int(cfg.d_model)
        self.num_layers = int(cfg.encoder_layers) + 1 if layers == "all" else 1
        self.identity = self._identity("whisper", checkpoint, fingerprint, "all" if layers == "all" else "last")
        if frozen:
            self.freeze()

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """``(N, S')`` with ``S' <= window_samples`` -> ``(N, num_mel_bins, mel_frames)`` padded log-mel features."""
        feats = self.feature_extractor(
            [a for a in audio.detach().float().cpu().numpy()], sampling_rate=SAMPLE_RATE, return_tensors="pt",
            padding="max_length", max_length=self.window_samples, truncation=False,
            device=str(audio.device),
        ).input_features
        return feats.to(audio.device)

    def sequence_features(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` at 16 kHz -> ``(B, ceil(S / 320), L, d)`` Whisper hidden states at 50 Hz, float32."""
        self._check_audio(audio)
        b, s = audio.shape
        n_win = math.ceil(s / self.window_samples)
        padded = Fn.pad(audio, (0, n_win * self.window_samples - s))
        chunks = padded.reshape(b * n_win, self.window_samples)  # consecutive windows, each encoded alone
        mel = self.log_mel(chunks).to(self.encoder.dtype)
        out = self.encoder(mel, output_hidden_states=True)
        hs = out.hidden_states if self.layers == "all" else (out.last_hidden_state,)
        if len(hs) != self.num_layers:
            raise RuntimeError(f"Whisper returned {len(hs)} hidden states, expected {self.num_layers}")
        seq = torch.stack(hs, dim=2)  # (B * n_win, max_source_positions, L, d)
        seq = seq.reshape(b, n_win * seq.shape[1], self.num_layers, self.hidden_size)
        return seq[:, : self.num_steps(s)].float()


# --------------------------------------------------------------------------------------------------------------
# wav2vec2
# --------------------------------------------------------------------------------------------------------------

_W2V_EXPECTED = ("a transformers Wav2Vec2 directory (config.json + model.safetensors or pytorch_model.bin, "
                 "optionally preprocessor_config.json), e.g. facebook/wav2vec2-base-960h")


class Wav2Vec2AudioEncoder(AudioEncoder):
    """wav2vec2 (``Wav2Vec2Model``) hidden states resampled to exactly 50 Hz, windowed per video frame.

    wav2vec2's conv front end has stride ``P`` (320) and receptive field ``R`` (400 samples), so its frame ``j`` is
    centred at sample ``j P + (R - 1) / 2``. ``sequence_features`` linearly interpolates those frames onto the 50 Hz
    grid of step centres ``320 n + 159.5`` (clamped at the ends), giving ``ceil(S / 320)`` steps that line up with the
    clip's time axis. Audio shorter than ``R`` is zero-padded to ``R``.

    ``layers="all"``: the ``num_hidden_layers + 1`` hidden states transformers returns (``L = 13`` for
    wav2vec2-base); ``"last"``: ``last_hidden_state`` only. Inputs are normalised to zero mean / unit variance per
    clip when the directory's ``preprocessor_config.json`` says ``do_normalize`` (default True without one).

    Args:
        path: local wav2vec2 directory (the value of config key ``key``), or ``None`` with ``random_config``.
        key: the config key naming ``path``, quoted in loading errors.
        window: ``w``; ``K = 2w + 1`` (``"concat"``).
        layers: ``"all"`` hidden states or only the ``"last"``.
        layer_layout: ``"concat"`` or ``"tokens"``.
        normalize: override the input normalisation (``None``: from the preprocessor config, else True).
        random_config: ``Wav2Vec2Config`` kwargs for a randomly initialised model, used only when ``path`` is ``None``.
        seed: seed for ``random_config`` weights.
        dtype: optional dtype to load the model in (features are returned as float32).
        frozen: no grads and eval mode (default).
    """

    def __init__(self, path: str | os.PathLike | None = None, key: str = "model.audio_encoder.path", window: int = 2,
                 layers: Literal["all", "last"] = "all", layer_layout: Literal["concat", "tokens"] = "concat",
                 normalize: bool | None = None, random_config: dict[str, Any] | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, frozen: bool = True) -> None:
        super().__init__(window=window, layer_layout=layer_layout, frozen=frozen)
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        self.model, d, checkpoint, fingerprint = _build_model(Wav2Vec2Model, Wav2Vec2Config, path, key, _W2V_EXPECTED,
                                                              layers, random_config, seed, dtype)
        pre = None if d is None else d / "preprocessor_config.json"
        if normalize is None:
            normalize = True
            if pre is not None and pre.exists():
                normalize = bool(json.loads(pre.read_text()).get("do_normalize", True))
        self.normalize = normalize
        cfg = self.model.config
        self.conv_stride = math.prod(cfg.conv_stride)
        rf, jump = 1, 1
        for k, st in zip(cfg.conv_kernel, cfg.conv_stride):
            rf += (k - 1) * jump
            jump *= st
        self.receptive_field = rf
        self.layers = layers
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers) + 1 if layers == "all" else 1
        extra = ("all" if layers == "all" else "last") + ("" if normalize else "-raw")
        self.identity = self._identity("wav2vec2", checkpoint, fingerprint, extra)
        if frozen:
            self.freeze()

    def _resample_to_steps(self, h: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``(B, T_raw, ...)`` native frames -> ``(B, ceil(S / 320), ...)`` by linear interpolation in time."""
        t_raw = h.shape[1]
        steps = self.num_steps(num_samples)
        centres = torch.arange(steps, dtype=torch.float64) * SAMPLES_PER_STEP + (SAMPLES_PER_STEP - 1) / 2
        pos = ((centres - (self.receptive_field - 1) / 2) / self.conv_stride).clamp(0, t_raw - 1)
        lo = pos.floor().long().clamp(max=t_raw - 1)
        hi = (lo + 1).clamp(max=t_raw - 1)
        frac = (pos - lo).to(h.device, h.dtype).view(1, -1, *([1] * (h.ndim - 2)))
        lo, hi = lo.to(h.device), hi.to(h.device)
        return h[:, lo] * (1 - frac) + h[:, hi] * frac

    def sequence_features(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` at 16 kHz -> ``(B, ceil(S / 320), L, d)`` wav2vec2 hidden states at 50 Hz, float32."""
        self._check_audio(audio)
        s = audio.shape[1]
        x = audio.float()
        if self.normalize:  # per clip, like Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm
            x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-7)
        if s < self.receptive_field:
            x = Fn.pad(x, (0, self.receptive_field - s))
        out = self.model(x.to(self.model.dtype), output_hidden_states=self.layers == "all")
        hs = out.hidden_states if self.layers == "all" else (out.last_hidden_state,)
        if len(hs) != self.num_layers:
            raise RuntimeError(f"wav2vec2 returned {len(hs)} hidden states, expected {self.num_layers}")
        seq = torch.stack(hs, dim=2).float()  # (B, T_raw, L, d)
        return self._resample_to_steps(seq, s)
