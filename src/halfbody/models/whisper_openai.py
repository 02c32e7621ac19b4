"""OpenAI-format Whisper checkpoints (``openai/whisper``'s ``*.pt``, e.g. EchoMimicV2's ``audio_processor/tiny.pt``).

An OpenAI checkpoint is ``torch.save({"dims": {...}, "model_state_dict": {...}})`` with the ``ModelDimensions``
fields (``n_mels``, ``n_audio_ctx``, ``n_audio_state``, ``n_audio_head``, ``n_audio_layer``, ``n_vocab``,
``n_text_ctx``, ``n_text_state``, ``n_text_head``, ``n_text_layer``) and OpenAI's key names (released weights are
float16). This module maps it to transformers' ``WhisperModel`` layout and back:

====================================================  ==============================================================
OpenAI                                                transformers ``WhisperModel``
====================================================  ==============================================================
``encoder.conv1`` / ``encoder.conv2``                 ``encoder.conv1`` / ``encoder.conv2``
``encoder.positional_embedding`` (a buffer)           ``encoder.embed_positions.weight``
``{enc,dec}oder.blocks.N.attn.{query,key,value,out}``  ``...layers.N.self_attn.{q,k,v,out}_proj`` (key: no bias)
``{enc,dec}oder.blocks.N.attn_ln``                    ``...layers.N.self_attn_layer_norm``
``decoder.blocks.N.cross_attn.*`` / ``cross_attn_ln``  ``decoder.layers.N.encoder_attn.*`` / ``encoder_attn_layer_norm``
``{enc,dec}oder.blocks.N.mlp.0`` / ``mlp.2``            ``...layers.N.fc1`` / ``fc2``
``{enc,dec}oder.blocks.N.mlp_ln``                     ``...layers.N.final_layer_norm``
``encoder.ln_post`` / ``decoder.ln``                  ``encoder.layer_norm`` / ``decoder.layer_norm``
``decoder.token_embedding`` / ``positional_embedding``  ``decoder.embed_tokens.weight`` / ``embed_positions.weight``
====================================================  ==============================================================

Loading is ``torch.load(weights_only=True)``; every tensor must map to a parameter of the model ``dims`` describes,
with its shape, or loading fails with one line naming the file and the missing / unexpected / mis-shaped keys.

    python -m halfbody.models.whisper_openai pretrained/EchoMimicV2/audio_processor/tiny.pt pretrained/whisper-tiny

writes the same weights as a transformers directory (``save_pretrained`` + a ``WhisperFeatureExtractor``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from halfbody.models.pretrained import PretrainedNotFoundError
from halfbody.utils.errors import UserError

__all__ = ["DIMS_FIELDS", "read_openai_checkpoint", "whisper_config", "openai_to_transformers",
           "transformers_to_openai", "load_openai_whisper_encoder", "save_openai_checkpoint",
           "convert_to_transformers_dir"]

DIMS_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_vocab", "n_text_ctx",
               "n_text_state", "n_text_head", "n_text_layer")

# per-block renames (OpenAI -> transformers), after ``blocks.N`` -> ``layers.N``
_BLOCK = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TOP = {
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "encoder.ln_post.weight": "encoder.layer_norm.weight",
    "encoder.ln_post.bias": "encoder.layer_norm.bias",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
    "decoder.ln.weight": "decoder.layer_norm.weight",
    "decoder.ln.bias": "decoder.layer_norm.bias",
}
_CONV = re.compile(r"^encoder\.conv[12]\.(weight|bias)$")
_OAI_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}


def _openai_key(key: str) -> str | None:
    """transformers key -> OpenAI key (None when it has no OpenAI counterpart)."""
    if key in _TOP_INV:
        return _TOP_INV[key]
    if _CONV.match(key):
        return key
    m = _HF_BLOCK.match(key)
    if m and m.group(3) in _BLOCK_INV:
        return f"{m.group(1)}.blocks.{m.group(2)}.{_BLOCK_INV[m.group(3)]}.{m.group(4)}"
    return None


def _transformers_key(key: str) -> str | None:
    """OpenAI key -> transformers key (None when it is not an OpenAI Whisper key)."""
    if key in _TOP:
        return _TOP[key]
    if _CONV.match(key):
        return key
    m = _OAI_BLOCK.match(key)
    if m and m.group(3) in _BLOCK:
        return f"{m.group(1)}.layers.{m.group(2)}.{_BLOCK[m.group(3)]}.{m.group(4)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def read_openai_checkpoint(path: str | os.PathLike, key: str = "model.audio_encoder.path"
                           ) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """``(dims, state_dict)`` of an OpenAI Whisper ``.pt`` (``torch.load(weights_only=True)``, on the CPU).

    Errors are one line naming ``path`` (and the config key ``key`` that named it).
    """
    p = Path(os.path.expanduser(str(path)))
    where = f"{key}={str(p)!r}"
    if not p.is_file():
        raise PretrainedNotFoundError(f"{where}: no such file: expected OpenAI's Whisper checkpoint (e.g. "
                                      f"EchoMimicV2's audio_processor/tiny.pt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file / pickled objects weights_only refuses
        raise UserError(f"{where}: not a loadable Whisper checkpoint ({_first_line(e)})") from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{where}: not an OpenAI Whisper checkpoint: expected a dict with 'dims' and "
                        f"'model_state_dict', found {found}")
    dims, sd = ckpt["dims"], ckpt["model_state_dict"]
    if not isinstance(dims, dict) or not isinstance(sd, dict):
        raise UserError(f"{where}: 'dims' and 'model_state_dict' must be dicts")
    missing = [f for f in DIMS_FIELDS if f not in dims]
    bad = [f for f in DIMS_FIELDS if f in dims and (not isinstance(dims[f], int) or dims[f] < 1)]
    if missing or bad:
        raise UserError(f"{where}: 'dims' lacks {missing} / has non-positive-integer {bad}: expected "
                        f"{list(DIMS_FIELDS)}")
    not_tensors = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserError(f"{where}: 'model_state_dict' holds non-tensors at {not_tensors[:5]}")
    return {f: int(dims[f]) for f in DIMS_FIELDS}, sd


def whisper_config(dims: dict[str, int], source: str = "dims"):
    """The transformers ``WhisperConfig`` of OpenAI ``ModelDimensions`` (MLPs are 4x wide in OpenAI's model)."""
    from transformers import WhisperConfig

    if dims["n_text_state"] != dims["n_audio_state"]:
        raise UserError(f"{source}: n_text_state={dims['n_text_state']} != n_audio_state={dims['n_audio_state']}: "
                        f"transformers' Whisper has one d_model")
    if dims["n_audio_state"] % dims["n_audio_head"] or dims["n_text_state"] % dims["n_text_head"]:
        raise UserError(f"{source}: the state width must be a multiple of the head count ({dims})")
    special: dict[str, Any] = {}
    if dims["n_vocab"] <= 50258:  # a small test vocabulary: OpenAI's special-token ids must still index it
        last = dims["n_vocab"] - 1
        special = dict(pad_token_id=last, bos_token_id=last, eos_token_id=last, decoder_start_token_id=last,
                       suppress_tokens=[], begin_suppress_tokens=[])
    return WhisperConfig(vocab_size=dims["n_vocab"], num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
                         encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
                         encoder_ffn_dim=4 * dims["n_audio_state"], decoder_layers=dims["n_text_layer"],
                         decoder_attention_heads=dims["n_text_head"], decoder_ffn_dim=4 * dims["n_text_state"],
                         max_source_positions=dims["n_audio_ctx"], max_target_positions=dims["n_text_ctx"],
                         **special)


def _expected_shapes(config) -> dict[str, torch.Size]:
    from transformers import WhisperModel

    with torch.device("meta"):
        model = WhisperModel(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_keys(got: dict[str, torch.Size], expected: dict[str, torch.Size], where: str,
                name_of=lambda k: k) -> None:
    missing = sorted(name_of(k) for k in expected if k not in got)
    unexpected = sorted(name_of(k) for k in got if k not in expected)
    shapes = sorted(f"{name_of(k)} {tuple(got[k])} != {tuple(expected[k])}" for k in got
                    if k in expected and got[k] != expected[k])
    if missing or unexpected or shapes:
        parts = [f"{label} {vals[:6]}{' ...' if len(vals) > 6 else ''}"
                 for label, vals in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if vals]
        raise UserError(f"{where}: does not match its dims: " + "; ".join(parts))


def openai_to_transformers(sd: dict[str, torch.Tensor], dims: dict[str, int], where: str = "checkpoint"
                           ) -> dict[str, torch.Tensor]:
    """OpenAI ``model_state_dict`` -> transformers ``WhisperModel`` state dict; strict (every tensor consumed, every
    parameter filled, shapes checked against ``dims``), errors name ``where`` and the OpenAI keys."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        hf = _transformers_key(k)
        if hf is None:
            unknown.append(k)
        else:
            out[hf] = v
    expected = _expected_shapes(whisper_config(dims, where))
    if unknown:
        got = {**{k: v.shape for k, v in out.items()}, **{f"?{k}": sd[k].shape for k in unknown}}
    else:
        got = {k: v.shape for k, v in out.items()}
    _check_keys(got, expected, where, name_of=lambda k: k[1:] if k.startswith("?") else (_openai_key(k) or k))
    return out


def transformers_to_openai(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``WhisperModel`` state dict -> OpenAI ``model_state_dict`` (the inverse of
    :func:`openai_to_transformers`); a key with no OpenAI counterpart is an error."""
    out, unknown = {}, []
    for k, v in sd.items():
        oai = _openai_key(k)
        if oai is None:
            unknown.append(k)
        else:
            out[oai] = v
    if unknown:
        raise UserError(f"transformers Whisper keys with no OpenAI counterpart: {sorted(unknown)[:6]}")
    return out


def load_openai_whisper_encoder(path: str | os.PathLike, key: str = "model.audio_encoder.path",
                                dtype: torch.dtype | None = None):
    """transformers ``WhisperEncoder`` (eval mode) holding the encoder of an OpenAI checkpoint.

    The whole checkpoint is checked (decoder included); only the encoder is built. Weights are cast to ``dtype``
    (default float32; released checkpoints store float16, which the official code also loads into float32).
    """
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    dims, sd = read_openai_checkpoint(path, key)
    where = f"{key}={str(path)!r}"
    hf = openai_to_transformers(sd, dims, where)
    config = whisper_config(dims, where)
    dtype = dtype or torch.float32
    enc_sd = {k[len("encoder."):]: v.to(dtype) for k, v in hf.items() if k.startswith("encoder.")}
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    encoder.load_state_dict(enc_sd, strict=True, assign=True)
    leftover = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the checkpoint cannot fill (a transformers version with extra buffers)
        raise RuntimeError(f"{where}: WhisperEncoder tensors not filled from the checkpoint: {leftover}")
    return encoder.eval(), config


def save_openai_checkpoint(model, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write a transformers ``WhisperModel`` as an OpenAI checkpoint (``{"dims", "model_state_dict"}``, float16 as
    released), to a temporary name next to ``path`` and renamed when complete."""
    c = model.config
    if (c.encoder_ffn_dim, c.decoder_ffn_dim) != (4 * c.d_model, 4 * c.d_model):
        raise UserError(f"OpenAI's Whisper format has MLPs of 4 x d_model = {4 * c.d_model}; this model has "
                        f"encoder_ffn_dim={c.encoder_ffn_dim}, decoder_ffn_dim={c.decoder_ffn_dim}")
    dims = dict(n_mels=c.num_mel_bins, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model,
                n_audio_head=c.encoder_attention_heads, n_audio_layer=c.encoder_layers, n_vocab=c.vocab_size,
                n_text_ctx=c.max_target_positions, n_text_state=c.d_model, n_text_head=c.decoder_attention_heads,
                n_text_layer=c.decoder_layers)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in transformers_to_openai(model.state_dict()).items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        torch.save({"dims": dims, "model_state_dict": sd}, tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def convert_to_transformers_dir(path: str | os.PathLike, out: str | os.PathLike,
                                key: str = "checkpoint") -> Path:
    """An OpenAI checkpoint -> a transformers directory (``WhisperModel.save_pretrained`` in float32 +
    ``WhisperFeatureExtractor``), written to a temporary directory next to ``out`` and renamed when complete."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    dims, sd = read_openai_checkpoint(path, key)
    where = f"{key}={str(path)!r}"
    hf = {k: v.float() for k, v in openai_to_transformers(sd, dims, where).items()}
    with torch.device("meta"):
        model = WhisperModel(whisper_config(dims, where))
    model.load_state_dict(hf, strict=True, assign=True)
    dst = Path(out)
    if dst.exists():
        raise UserError(f"{dst} exists: choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=dims["n_mels"]).save_pretrained(tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def main(argv: list[str] | None = None) -> int:
    from halfbody.utils.errors import exit_on_user_error

    ap = argparse.ArgumentParser(description="Convert an OpenAI Whisper checkpoint (.pt) to a transformers directory.")
    ap.add_argument("checkpoint", help="OpenAI .pt, e.g. pretrained/EchoMimicV2/audio_processor/tiny.pt")
    ap.add_argument("out", help="new transformers directory")
    args = ap.parse_args(argv)
    with exit_on_user_error():
        try:
            out = convert_to_transformers_dir(args.checkpoint, args.out, key="checkpoint")
        except PretrainedNotFoundError as e:
            raise UserError(str(e)) from e
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
