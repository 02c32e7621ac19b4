"""Frozen audio encoders that turn 16 kHz speech into per-video-frame feature windows.

Interface (docs/ARCHITECTURE.md, "Audio encoder interface"):

    forward(audio (B, S) float at 16 kHz, num_frames: int, fps: float) -> (B, F, K, D)

Both encoders first compute a 50 Hz sequence of hidden states from several layers,
``sequence_features(audio) -> (B, T50, L, d)`` with ``T50 = ceil(S / 320)`` (the release's Whisper variant:
``floor(S / 320)``), then cut, for each video frame ``i``, the window of steps ``c_i - before .. c_i + after``
(``window``: ``w`` for ``before = after = w``, or ``[before, after]``), indices clamped to ``[0, T50 - 1]`` (edge
replication). The centre step is ``c_i = floor(i / fps * 50 + 0.5)`` (``centring="round"``, default) or
``floor(i * 50 / fps)`` (``centring="floor"``). EchoMimic(V2)'s official per-frame Whisper window is
``window=[4, 5]`` with ``centring="floor"``: ``int(i * 50 / fps)`` and the 10 steps ``[c - 4, c + 6)``
(``conf/model/audio_encoder/whisper_tiny_release.yaml``); ``window=w`` gives a symmetric window, ``K`` odd.

Layers are arranged by ``layer_layout``:

- ``"concat"`` (default): layers concatenated along the feature axis, ``K = before + 1 + after``, ``D = L * d``
  (whisper-tiny, all 5 hidden states: ``D = 1920``);
- ``"tokens"``: every (step, layer) pair is a token, step-major, ``K = (before + 1 + after) * L``, ``D = d`` (the
  layout of EchoMimic's official whisper chunks, ``(F, 50, 384)``).

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
from typing import Any, Literal, Sequence

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


def _window_sides(window: int | Sequence[int]) -> tuple[int, int]:
    """``w`` or ``[before, after]`` -> ``(before, after)`` 50-Hz steps around a frame's centre step."""
    if isinstance(window, (int, float)) and not isinstance(window, bool) and int(window) == window:
        before = after = int(window)
    else:
        try:
            before, after = (int(v) for v in window)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"window must be an int w or [before, after], got {window!r}") from None
    if before < 0 or after < 0:
        raise ValueError(f"window must be >= 0 on both sides, got {window!r}")
    return before, after


def frame_window_indices(num_frames: int, fps: float, window: int | Sequence[int], num_steps: int,
                         feature_rate: float = FEATURE_RATE, device: torch.device | str | None = None,
                         start_step: float = 0.0, centring: Literal["round", "floor"] = "round") -> torch.Tensor:
    """Indices ``(F, before + 1 + after)`` into a ``num_steps``-long feature sequence at ``feature_rate`` Hz.

    Row ``i`` is ``c_i - before, ..., c_i + after`` clamped to the sequence, with ``t_i = start_step + i *
    feature_rate / fps`` and ``c_i = floor(t_i + 0.5)`` (``centring="round"``) or ``floor(t_i)`` (``"floor"``, the
    EchoMimic(V2) release's ``int(i * 50 / fps)``); ``window`` is ``w`` (``before = after = w``) or
    ``[before, after]``. ``start_step`` is where frame 0 lies in the sequence (the window's offset in an audio
    context).
    """
    before, after = _window_sides(window)
    if num_frames < 1 or fps <= 0 or num_steps < 1:
        raise ValueError(f"need num_frames >= 1, fps > 0, num_steps >= 1; got {num_frames}, {fps}, {num_steps}")
    if centring not in ("round", "floor"):
        raise ValueError(f"centring must be 'round' or 'floor', got {centring!r}")
    # (i * rate) / fps in float64: bit for bit the release's Python ``i * 50 / fps``
    t = start_step + torch.arange(num_frames, dtype=torch.float64) * feature_rate / fps
    centres = torch.floor(t + 0.5 if centring == "round" else t).long()
    idx = centres[:, None] + torch.arange(-before, after + 1)[None, :]
    return idx.clamp_(0, num_steps - 1).to(device)


def _host_floats(values: torch.Tensor | Sequence[float]) -> list[float]:
    """Per-sample numbers as Python floats (a tensor is read back once; host sequences pass as they are)."""
    return [float(v) for v in (values.double().cpu().tolist() if torch.is_tensor(values) else values)]


def _host_ints(values: torch.Tensor | Sequence[int]) -> list[int]:
    return [int(v) for v in (values.cpu().tolist() if torch.is_tensor(values) else values)]


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short hex fingerprint of a local checkpoint directory (or of one checkpoint file).

    Hashes the JSON configs in full and, for each weight file, its name, size and 256 evenly spaced 64 KiB blocks
    (about 16 MiB read per file, so it stays fast for large checkpoints yet changes with any substantial fine-tune).
    """
    p = Path(path)
    h = hashlib.sha1()
    for f in sorted(p.glob("*.json")) if p.is_dir() else ():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    block, blocks = 1 << 16, 256
    for f in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]) if p.is_dir() else [p]:
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
        window: ``w``, 50-Hz steps on each side of a frame's centre step, or ``[before, after]`` (the release's
            Whisper window is ``[4, 5]``: 10 steps).
        layer_layout: ``"concat"`` or ``"tokens"`` (see the module docstring).
        frozen: no grads and eval mode even when a parent calls ``.train()`` (default).
        centring: a frame's centre step, ``"round"`` (``floor(t + 0.5)``, default) or ``"floor"`` (``floor(t)``, the
            release's ``int(i * 50 / fps)``); see :func:`frame_window_indices`.
    """

    num_layers: int
    hidden_size: int
    identity: str
    # True when zeros appended to the audio leave the features of the samples before them unchanged (a batch of
    # zero-padded contexts can then be encoded at once)
    padding_invariant: bool = False
    sample_rate: int = SAMPLE_RATE
    feature_rate: int = FEATURE_RATE

    def __init__(self, window: int | Sequence[int] = 2, layer_layout: Literal["concat", "tokens"] = "concat",
                 frozen: bool = True, centring: Literal["round", "floor"] = "round") -> None:
        super().__init__()
        self.window_before, self.window_after = _window_sides(window)
        if layer_layout not in ("concat", "tokens"):
            raise ValueError(f"layer_layout must be 'concat' or 'tokens', got {layer_layout!r}")
        if centring not in ("round", "floor"):
            raise ValueError(f"centring must be 'round' or 'floor', got {centring!r}")
        symmetric = self.window_before == self.window_after
        self.window: int | tuple[int, int] = self.window_before if symmetric else (self.window_before,
                                                                                   self.window_after)
        self.centring = centring
        self.layer_layout = layer_layout
        self.frozen = frozen

    @property
    def feature_dim(self) -> int:
        """``D``."""
        return self.hidden_size * self.num_layers if self.layer_layout == "concat" else self.hidden_size

    @property
    def tokens_per_frame(self) -> int:
        """``K``."""
        k = self.window_before + 1 + self.window_after
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
        w = f"w{self.window}" if isinstance(self.window, int) else f"w{self.window_before}_{self.window_after}"
        centring = "" if self.centring == "round" else self.centring
        parts = [family, _safe(checkpoint), fingerprint, extra, w, centring, self.layer_layout]
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
            idx = frame_window_indices(num_frames, fps, self.window, t, self.feature_rate, device=seq.device,
                                       centring=self.centring)
            idx = idx.expand(b, -1, -1)
        else:
            starts = [0.0] * b if start_steps is None else _host_floats(start_steps)
            valid = [t] * b if valid_steps is None else [min(v, t) for v in _host_ints(valid_steps)]
            idx = torch.stack([frame_window_indices(num_frames, fps, self.window, valid[i], self.feature_rate,
                                                    device=seq.device, start_step=starts[i], centring=self.centring)
                               for i in range(b)])
        k = idx.shape[-1]
        w = seq[torch.arange(b, device=seq.device)[:, None], idx.reshape(b, -1)]  # (B, F * (2w+1), L, d)
        if self.layer_layout == "concat":
            return w.reshape(b, num_frames, k, l * d)
        return w.reshape(b, num_frames, k * l, d)

    def context_features(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S)`` zero-padded audio of per-sample ``lengths`` -> ``(B, T50, L, d)``: each sample's features as if
        encoded alone (batched when trailing zeros cannot change the features, ``padding_invariant``)."""
        if lengths is None or self.padding_invariant:
            return self.sequence_features(audio)
        lengths = _host_ints(lengths)
        if all(n == audio.shape[1] for n in lengths):
            return self.sequence_features(audio)
        seqs = [self.sequence_features(audio[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
        return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)

    def forward(self, audio: torch.Tensor, num_frames: int, fps: float,
                offsets: torch.Tensor | Sequence[float] | None = None,
                lengths: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """``(B, S)`` 16 kHz audio -> ``(B, num_frames, K, D)`` windows of 50 Hz features.

        With an audio context (EchoMimicV2 parity issue §1), ``audio`` holds more than the frames: ``offsets`` ``(B,)``
        is each sample's first frame in samples, ``lengths`` ``(B,)`` its unpadded length. The encoder runs on the
        whole context and each frame's window is sliced from it, so a frame hears the speech around it whatever
        the training window. ``offsets`` and ``lengths`` given as host numbers (the training step's
        ``batch["host"]``) keep the step free of device read-backs.
        """
        seq = self.context_features(audio, lengths)
        if offsets is None and lengths is None:
            return self.windows(seq, num_frames, fps)
        starts = None if offsets is None else [v / SAMPLES_PER_STEP for v in _host_floats(offsets)]
        valid = None if lengths is None else [self.num_steps(n) for n in _host_ints(lengths)]
        return self.windows(seq, num_frames, fps, starts, valid)


# --------------------------------------------------------------------------------------------------------------
# Whisper
# --------------------------------------------------------------------------------------------------------------

_WHISPER_EXPECTED = ("a transformers Whisper directory (config.json + model.safetensors, optionally "
                     "preprocessor_config.json), e.g. openai/whisper-tiny, or OpenAI's Whisper checkpoint file, e.g. "
                     "EchoMimicV2's audio_processor/tiny.pt")


def _build_model(model_cls, config_cls, path, key: str, expected: str, layers: str,
                 random_config: dict[str, Any] | None, seed: int, dtype: torch.dtype | None,
                 allowed_layers: tuple[str, ...] = ("all", "last")):
    """A transformers model from the local directory ``path`` (config key ``key``), or seeded random weights from
    ``random_config`` when ``path`` is None. Returns ``(model, directory or None, checkpoint name, fingerprint)``."""
    if layers not in allowed_layers:
        raise ValueError(f"layers must be one of {list(allowed_layers)}, got {layers!r}")
    if path is None and random_config is not None:
        random_config = to_plain(random_config)  # Hydra hands ListConfig values, which transformers configs reject
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config_cls(**random_config))
        return model, None, "random", f"s{seed}-{_config_fingerprint(random_config, seed)}"
    model = load_pretrained(model_cls, path, key, expected, **_dtype_kwargs(dtype))
    d = Path(os.path.expanduser(str(path)))
    return model, d, d.name, checkpoint_fingerprint(d)


# Whisper's log-mel front end (OpenAI's audio.py constants; transformers' WhisperFeatureExtractor defaults)
N_FFT = 400
HOP_LENGTH = 160


class WhisperAudioEncoder(AudioEncoder):
    """Whisper encoder hidden states of all layers at 50 Hz, windowed per video frame (EchoMimicV2 with whisper-tiny).

    **Weights.** ``path`` is a transformers Whisper directory, or a file in OpenAI's format (``{"dims",
    "model_state_dict"}``, e.g. the release's ``audio_processor/tiny.pt``, loaded with ``weights_only=True`` and
    mapped to transformers' layout by :mod:`halfbody.models.whisper_openai`); the same weights give the same
    features either way.

    **Layers** (``L``, each ``d = d_model`` wide):

    - ``"all"``: the hidden states transformers returns (embedding, layers 1..N-1, then the final layer *after* the
      encoder's last LayerNorm), ``L = encoder_layers + 1``;
    - ``"blocks"``: the embedding (after the positional embedding) and every block's output, all *before* the final
      LayerNorm (``ln_post``): the release's ``encoder_embeddings`` (its modified ``AudioEncoder.forward`` records
      the block outputs and never applies ``ln_post`` to them), ``L = encoder_layers + 1`` (5 for whisper-tiny);
    - ``"last"``: the final LayerNorm's output only, ``L = 1``.

    **Log-mel and 30 s segments** (``mel``). The encoder takes exactly ``2 * max_source_positions`` mel frames
    (30 s for released checkpoints):

    - ``"transformers"`` (default): the audio is cut into consecutive 30 s windows, each zero-padded *as audio* and
      turned into log-mel by the ``WhisperFeatureExtractor`` of the directory (``preprocessor_config.json``; else
      Whisper's defaults), so each window's dynamic-range floor (max - 8) is its own; ``T50 = ceil(S / 320)``.
    - ``"release"``: as the release's ``Audio2Feature.audio2feat`` / modified ``transcribe``: one log-mel of the
      whole input (``torch.stft`` n_fft 400, hop 160, Hann, centred with reflection, the last STFT frame dropped,
      Slaney mel filters, ``log10(max(., 1e-10))``, floor at the *whole input's* max - 8, ``(x + 4) / 4``); cut into
      3000-frame segments, the last one padded with zeros *in the log-mel domain*; each segment encoded alone and
      its first ``floor(frames / 2)`` outputs kept, concatenated: ``T50 = floor(S / 320)`` (at least 1).

    Windowing (``window``, ``centring``, ``layer_layout``) is :class:`AudioEncoder`'s. The release's per-frame
    feature (``get_sliced_feature`` with ``audio_feat_length=[2, 2]``) is ``window=[4, 5]``, ``centring="floor"``,
    ``layers="blocks"``, ``mel="release"``, ``layer_layout="tokens"``: 10 steps x 5 states = 50 tokens x 384 per
    frame (``conf/model/audio_encoder/whisper_tiny_release.yaml``). The release runs the encoder in float16 on GPU;
    here it runs in ``dtype`` (float32 by default).

    Args:
        path: local Whisper directory or OpenAI ``.pt`` (the value of config key ``key``), or ``None`` with
            ``random_config``.
        key: the config key naming ``path``, quoted in loading errors.
        window: ``w`` or ``[before, after]``.
        layers: ``"all"``, ``"blocks"`` or ``"last"`` (above).
        layer_layout: ``"concat"`` or ``"tokens"``.
        random_config: ``WhisperConfig`` kwargs for a randomly initialised encoder (tiny CPU presets), used only when
            ``path`` is ``None``; weights are drawn under ``torch.manual_seed(seed)``.
        seed: see ``random_config``.
        dtype: optional dtype to load the model in (features are returned as float32).
        frozen: no grads and eval mode (default).
        centring: ``"round"`` or ``"floor"`` (the release).
        mel: ``"transformers"`` or ``"release"`` (above).
    """

    def __init__(self, path: str | os.PathLike | None = None, key: str = "model.audio_encoder.path",
                 window: int | Sequence[int] = 2, layers: Literal["all", "blocks", "last"] = "all",
                 layer_layout: Literal["concat", "tokens"] = "concat", random_config: dict[str, Any] | None = None,
                 seed: int = 0, dtype: torch.dtype | None = None, frozen: bool = True,
                 centring: Literal["round", "floor"] = "round",
                 mel: Literal["transformers", "release"] = "transformers") -> None:
        super().__init__(window=window, layer_layout=layer_layout, frozen=frozen, centring=centring)
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

        if mel not in ("transformers", "release"):
            raise ValueError(f"mel must be 'transformers' or 'release', got {mel!r}")
        if path is not None and Path(os.path.expanduser(str(path))).is_file():  # OpenAI's format
            from halfbody.models.whisper_openai import load_openai_whisper_encoder

            if layers not in ("all", "blocks", "last"):
                raise ValueError(f"layers must be one of ['all', 'blocks', 'last'], got {layers!r}")
            p = Path(os.path.expanduser(str(path)))
            self.encoder, cfg = load_openai_whisper_encoder(p, key, dtype)
            fe_dir, checkpoint, fingerprint = None, p.stem, checkpoint_fingerprint(p)
        else:
            model, fe_dir, checkpoint, fingerprint = _build_model(
                WhisperModel, WhisperConfig, path, key, _WHISPER_EXPECTED, layers, random_config, seed, dtype,
                allowed_layers=("all", "blocks", "last"))
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
        if mel == "release" and (fe.n_fft, fe.hop_length) != (N_FFT, HOP_LENGTH):
            raise ValueError(f"mel='release' is Whisper's n_fft {N_FFT} / hop {HOP_LENGTH}; {path} has "
                             f"{fe.n_fft} / {fe.hop_length}")
        stride = self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
        if fe.hop_length * stride != SAMPLES_PER_STEP:
            raise ValueError(f"Whisper hop_length {fe.hop_length} x conv stride {stride} must be {SAMPLES_PER_STEP} "
                             f"samples (50 Hz outputs)")
        self.mel_frames = cfg.max_source_positions * stride  # the encoder's fixed input length
        self.window_samples = self.mel_frames * fe.hop_length  # 480000 (30 s) for released checkpoints
        self.mel = mel
        # each 30 s window is zero-padded by Whisper itself, so trailing zeros change nothing before them; the
        # release's log-mel floor depends on the whole input (and reflects at its end), so it is not
        self.padding_invariant = mel == "transformers"
        # the log-mel runs on the encoder's device with torch ops (no copy to the host and back per training step)
        self.register_buffer("stft_window", torch.hann_window(fe.n_fft), persistent=False)
        if mel == "release":
            from transformers.audio_utils import mel_filter_bank

            filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=cfg.num_mel_bins,
                                      min_frequency=0.0, max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE,
                                      norm="slaney", mel_scale="slaney")  # librosa's filters, as the release's asset
        else:
            filters = fe.mel_filters  # (n_freq, n_mels): the feature extractor's own filters
        self.register_buffer("mel_filters", torch.as_tensor(filters.T).float().contiguous(), persistent=False)
        self.layers = layers
        self.hidden_size = int(cfg.d_model)
        self.num_layers = int(cfg.encoder_layers) + 1 if layers in ("all", "blocks") else 1
        extra = layers + ("-melrel" if mel == "release" else "")
        self.identity = self._identity("whisper", checkpoint, fingerprint, extra)
        if frozen:
            self.freeze()

    def num_steps(self, num_samples: int) -> int:  # type: ignore[override]
        """``T50``: ``ceil(S / 320)`` (``mel="transformers"``) or the release's ``floor(S / 320)``; at least 1."""
        if self.mel == "release":
            return max(1, num_samples // SAMPLES_PER_STEP)
        return super().num_steps(num_samples)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """``(N, S')`` with ``S' <= window_samples`` -> ``(N, num_mel_bins, mel_frames)`` padded log-mel features
        (``mel="transformers"``): ``WhisperFeatureExtractor``'s log-mel (zero padding to the window, centred STFT with
        a Hann window, the last frame dropped, its mel filters, ``log10(max(., 1e-10))``, each window's floor at its
        max - 8, ``(x + 4) / 4``) computed with torch ops on ``audio``'s device."""
        fe = self.feature_extractor
        if getattr(fe, "dither", 0.0):  # random dither: the extractor's own path
            return self._extractor_log_mel(audio)
        x = Fn.pad(audio.detach().float(), (0, max(0, self.window_samples - audio.shape[1])))
        stft = torch.stft(x, fe.n_fft, fe.hop_length, window=self.stft_window.to(x.device, torch.float32),
                          return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log = torch.clamp(self.mel_filters.to(x.device, torch.float32) @ power, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0

    def _extractor_log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        feats = self.feature_extractor(
            [a for a in audio.detach().float().cpu().numpy()], sampling_rate=SAMPLE_RATE, return_tensors="pt",
            padding="max_length", max_length=self.window_samples, truncation=False,
            device=str(audio.device),
        ).input_features
        return feats.to(audio.device)

    def release_log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """``(N, S)`` -> ``(N, num_mel_bins, S // 160)``: the release's log-mel of each whole input (``mel="release"``),
        its floor at that input's max - 8."""
        x = audio.detach().float()
        n_frames = x.shape[1] // HOP_LENGTH
        if x.shape[1] <= N_FFT // 2:  # too short to reflect-pad (the release fails there); zeros after it
            x = Fn.pad(x, (0, N_FFT // 2 + 1 - x.shape[1]))
        stft = torch.stft(x, N_FFT, HOP_LENGTH, window=self.stft_window.to(x.device, torch.float32), center=True,
                          pad_mode="reflect", return_complex=True)
        power = stft[..., :n_frames].abs() ** 2  # drops the last frame (and the frames of the zeros above)
        spec = self.mel_filters.to(x.device, torch.float32) @ power
        log = torch.clamp(spec, min=1e-10).log10()
        floor = log.amax(dim=(1, 2), keepdim=True) - 8.0 if n_frames else log
        return (torch.maximum(log, floor) + 4.0) / 4.0

    def _encode(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """Encoder states of ``(N, num_mel_bins, mel_frames)`` mels: ``L`` tensors ``(N, mel_frames / 2, d)``."""
        if self.layers != "blocks":
            out = self.encoder(mel, output_hidden_states=self.layers == "all")
            return list(out.hidden_states) if self.layers == "all" else [out.last_hidden_state]
        states: list[torch.Tensor] = []

        def embedding(_m, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        def block(_m, _args, out):
            states.append(out[0] if isinstance(out, tuple) else out)

        layers = self.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(embedding, with_kwargs=True)]
        hooks += [layer.register_forward_hook(block) for layer in layers]
        try:
            self.encoder(mel)  # its last LayerNorm's output is not used
        finally:
            for h in hooks:
                h.remove()
        return states

    def sequence_features(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` at 16 kHz -> ``(B, T50, L, d)`` Whisper hidden states at 50 Hz, float32 (see ``mel``)."""
        self._check_audio(audio)
        b, s = audio.shape
        if self.mel == "release":
            mel = self.release_log_mel(audio)  # (B, n_mels, M)
            n_seg = max(1, math.ceil(mel.shape[2] / self.mel_frames))
            mel = Fn.pad(mel, (0, n_seg * self.mel_frames - mel.shape[2]))  # zeros in the log-mel domain
            mel = mel.reshape(b, mel.shape[1], n_seg, self.mel_frames).permute(0, 2, 1, 3)
            mel = mel.reshape(b * n_seg, -1, self.mel_frames)
        else:
            n_seg = math.ceil(s / self.window_samples)
            padded = Fn.pad(audio, (0, n_seg * self.window_samples - s))
            mel = self.log_mel(padded.reshape(b * n_seg, self.window_samples))  # each window encoded alone
        hs = self._encode(mel.to(self.encoder.dtype))
        if len(hs) != self.num_layers:
            raise RuntimeError(f"Whisper returned {len(hs)} hidden states, expected {self.num_layers}")
        seq = torch.stack(hs, dim=2)  # (B * n_seg, max_source_positions, L, d)
        seq = seq.reshape(b, n_seg * seq.shape[1], self.num_layers, self.hidden_size)
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
        centring: ``"round"`` (default) or ``"floor"``.
    """

    def __init__(self, path: str | os.PathLike | None = None, key: str = "model.audio_encoder.path",
                 window: int | Sequence[int] = 2, layers: Literal["all", "last"] = "all",
                 layer_layout: Literal["concat", "tokens"] = "concat", normalize: bool | None = None, random_config: dict[str, Any] | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, frozen: bool = True,
                 centring: Literal["round", "floor"] = "round") -> None:
        super().__init__(window=window, layer_layout=layer_layout, frozen=frozen, centring=centring)
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
