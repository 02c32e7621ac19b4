"""The released EchoMimicV2 weights (antgroup/echomimic_v2, ``BadToBest/EchoMimicV2``): import and export.

The release's ``pretrained_weights/`` directory::

    denoising_unet.pth      the denoiser's spatial UNet (attn2 keys/values 384 wide)     torch.save(state_dict)
    motion_module.pth       its 21 motion modules (``*.motion_modules.*``)               torch.save(state_dict)
    reference_unet.pth      the ReferenceNet (an SD UNet without cross-attention)        torch.save(state_dict)
    pose_encoder.pth        the pose encoder (16, 32, 96, 256 -> 320)                    torch.save(state_dict)
    denoising_unet_acc.pth, motion_module_acc.pth    the accelerated variant (same reference / pose files)
    audio_processor/tiny.pt                          whisper-tiny, OpenAI's format
    sd-vae-ft-mse/                                   diffusers AutoencoderKL
    sd-image-variations-diffusers/unet/config.json   the UNet config both UNets are built from

:class:`~halfbody.echomimic_v2.network.EchoMimicV2Network` uses the release's key names, so the mapping is by
prefix: ``reference_net.unet.<k>`` <-> ``reference_unet.pth:<k>``, ``denoising_unet.unet.<k>`` <->
``denoising_unet.pth:<k>`` (``motion_module.pth`` for ``*.motion_modules.*``), ``pose_encoder.<k>`` <->
``pose_encoder.pth:<k>``. Import is strict: every tensor of every file is consumed and every parameter and buffer
of the network is filled, else one error lists the missing / unexpected / mis-shaped keys per file. Files load with
``torch.load(weights_only=True)`` (or safetensors). Export writes the same four files back (what the official
``infer.py`` loads), so a model trained here runs in the official repository; import -> export is lossless.

CLI::

    python -m halfbody.echomimic_v2.official import --dir pretrained/EchoMimicV2 --out pretrained/echomimic_v2_imported
    python -m halfbody.echomimic_v2.official export --checkpoint logs/.../last.ckpt --out exported/pretrained_weights
    python -m halfbody.echomimic_v2.official export --network pretrained/echomimic_v2_imported/network --out ...

Training from the release: ``model/network=echomimic_v2_official`` (:func:`network_from_release`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.io import atomic_output

from .network import RELEASE_AUDIO_GAIN, RELEASE_TEMPORAL, UNET_WEIGHTS, EchoMimicV2Network

PARTS = ("denoising_unet", "motion_module", "reference_unet", "pose_encoder")
VARIANTS = ("standard", "acc")
# our state-dict prefix -> release file part
_PREFIXES = (("reference_net.unet.", "reference_unet"), ("denoising_unet.unet.", "denoising_unet"),
             ("pose_encoder.", "pose_encoder"))
_MOTION = ".motion_modules."
RELEASE_AUDIO_DIM = 384  # whisper-tiny's width: attn2's keys/values (inference_v2.yaml cross_attention_dim)
RELEASE_AUDIO_TOKENS = 50  # 10 steps of 50 Hz x 5 hidden states per video frame
RELEASE_POSE_CHANNELS = (16, 32, 96, 256)  # infer.py: PoseEncoder(320, 3, block_out_channels=(16, 32, 96, 256))


def release_filenames(variant: str = "standard") -> dict[str, str]:
    """Release file name of each part: the ``_acc`` variant replaces the denoiser and its motion modules only."""
    if variant not in VARIANTS:
        raise UserError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    suffix = "_acc" if variant == "acc" else ""
    return {"denoising_unet": f"denoising_unet{suffix}.pth", "motion_module": f"motion_module{suffix}.pth",
            "reference_unet": "reference_unet.pth", "pose_encoder": "pose_encoder.pth"}


def release_part(key: str) -> tuple[str, str] | None:
    """``(part, release key)`` of one of our network keys, or ``None`` if the release has no such tensor."""
    for prefix, part in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if part == "denoising_unet" and _MOTION in rest:
                return "motion_module", rest
            return part, rest
    return None


def our_key(part: str, key: str) -> str:
    prefix = {p: pre for pre, p in _PREFIXES}["denoising_unet" if part == "motion_module" else part]
    return prefix + key


def to_release(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Our network state dict -> the release's four state dicts (``dtype`` casts floating tensors)."""
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    foreign = []
    for k, v in state.items():
        where = release_part(k)
        if where is None:
            foreign.append(k)
            continue
        t = v.detach().cpu().contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        parts[where[0]][where[1]] = t
    if foreign:
        roots = sorted({k.split(".")[0] for k in foreign})
        raise UserError(f"the network has parts the released EchoMimicV2 does not ({', '.join(roots)}: "
                        f"{len(foreign)} tensors, e.g. {foreign[0]}); only audio_attention=direct networks export")
    return parts


def release_parameter_counts(net_or_state: EchoMimicV2Network | Mapping[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Tensors and elements per release file (what the release's files hold: parameters and persistent buffers)."""
    state = net_or_state.state_dict() if isinstance(net_or_state, torch.nn.Module) else net_or_state
    out = {p: {"tensors": 0, "numel": 0} for p in PARTS}
    for k, v in state.items():
        where = release_part(k)
        if where is not None:
            out[where[0]]["tensors"] += 1
            out[where[0]]["numel"] += v.numel()
    return out


# ----------------------------------------------------------------------------------------------------- reading


def read_state_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` (``weights_only=True``) or ``.safetensors`` file; one-line errors naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: missing (expected the release's {what})")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, unsafe pickle, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: cannot be read as a weights-only state dict ({type(e).__name__}: {first[:200]})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj):
        raise UserError(f"{p}: a Lightning training checkpoint, not the release's {what} (start training from it with "
                        f"model.init_checkpoint, or export it first)")
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise UserError(f"{p}: not a state dict of tensors (expected the release's {what})")
    return dict(obj)


def check_release_state(files: Mapping[str, Mapping[str, torch.Tensor]], expected: Mapping[str, torch.Size],
                        names: Mapping[str, str]) -> None:
    """Raise one ``UserError`` listing, per file, the missing / unexpected / mis-shaped keys (none: return).

    ``files``: part -> the file's state dict; ``expected``: our key -> shape; ``names``: part -> file path (for the
    message). A file none of whose keys belong to its part is reported as another model family's file.
    """
    want: dict[str, dict[str, torch.Size]] = {p: {} for p in files}
    for k, shape in expected.items():
        where = release_part(k)
        if where is not None and where[0] in want:
            want[where[0]][where[1]] = shape
    problems = []
    for part, sd in files.items():
        name = names[part]
        exp = want[part]
        if not exp.keys() & sd.keys():
            sample = next(iter(sd))
            problems.append(f"{name}: not an EchoMimicV2 {part} checkpoint (none of its {len(sd)} keys is the "
                            f"release's, e.g. {sample!r}; another model family's file?)")
            continue
        missing = [k for k in exp if k not in sd]
        unexpected = [k for k in sd if k not in exp]
        misshaped = [f"{k} {tuple(sd[k].shape)} (expected {tuple(exp[k])})" for k in exp
                     if k in sd and tuple(sd[k].shape) != tuple(exp[k])]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                problems.append(f"{name}: {len(keys)} {label} key(s): {', '.join(keys[:5])}{more}")
    if problems:
        raise UserError("the release's weights do not fit the network: " + "; ".join(problems))


def read_release(release_dir: str | os.PathLike, variant: str = "standard") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The four state dicts of a release directory: ``(part -> state dict, part -> path)``."""
    d = Path(release_dir)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory (expected the release's pretrained_weights/ with "
                        f"{', '.join(release_filenames(variant).values())})")
    names = {part: str(d / f) for part, f in release_filenames(variant).items()}
    files = {part: read_state_file(path, Path(path).name) for part, path in names.items()}
    # The official infer.py loads denoising_unet.pth after motion_module.pth (strict=False): a motion-module tensor
    # that the denoiser file also carries is taken from the denoiser file.
    den = files["denoising_unet"]
    moved = {k: den.pop(k) for k in [k for k in den if _MOTION in k]}
    if moved:
        files["motion_module"] = {**files["motion_module"], **moved}
    return files, names


def load_release_into(net: EchoMimicV2Network, files: Mapping[str, Mapping[str, torch.Tensor]],
                      names: Mapping[str, str]) -> EchoMimicV2Network:
    """Fill ``net`` (possibly on the meta device) from the release's state dicts, strictly; floats become the
    network's dtype (float32 on meta)."""
    state = net.state_dict()
    check_release_state(files, {k: v.shape for k, v in state.items()}, names)
    foreign = [k for k in state if release_part(k) is None]
    if foreign:
        raise UserError(f"the network has parts the released EchoMimicV2 does not ({foreign[0]}, ...): build it with "
                        f"audio_attention=direct")
    ours = {}
    for part, sd in files.items():
        for k, v in sd.items():
            key = our_key(part, k)
            ref = state[key]
            dtype = torch.float32 if ref.is_meta and v.is_floating_point() else (ref.dtype if v.is_floating_point() else v.dtype)
            ours[key] = v.to(dtype)
    net.load_state_dict(ours, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a non-persistent tensor the files cannot fill
        raise RuntimeError(f"network tensors not filled from the release: {left[:5]}")
    return net


# ----------------------------------------------------------------------------------------------------- building


def read_unet_config(path: str | os.PathLike | None, key: str) -> dict[str, Any]:
    """The UNet config both released UNets are built from (``sd-image-variations-diffusers/unet``): a directory with
    ``config.json`` or the file itself."""
    if not path:
        raise UserError(f"{key} is not set: expected the sd-image-variations-diffusers/unet directory (config.json)")
    p = Path(os.path.expanduser(str(path)))
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{key}={str(p)!r}: no config.json (expected the sd-image-variations-diffusers/unet directory)")
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: not a JSON UNet config ({e})") from None
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or "block_out_channels" not in cfg:
        raise UserError(f"{f}: not a diffusers UNet2DConditionModel config (_class_name={cfg.get('_class_name')!r})")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def release_network_kwargs() -> dict[str, Any]:
    """Constructor arguments of the released network beyond the UNet config (inference_v2.yaml, infer.py)."""
    return dict(audio_attention="direct", audio_gain=RELEASE_AUDIO_GAIN, latent_factor=8,
                pose_block_out_channels=list(RELEASE_POSE_CHANNELS), **RELEASE_TEMPORAL)


def _pose_widths(pose: Mapping[str, torch.Tensor]) -> list[int] | None:
    """The pose encoder's widths as stored in ``pose_encoder.pth`` (``None`` if the file does not say)."""
    try:
        widths = [int(pose["conv_in.weight"].shape[0])]
        i = 1
        while f"blocks.{i}.weight" in pose:
            widths.append(int(pose[f"blocks.{i}.weight"].shape[0]))
            i += 2
        return widths
    except (KeyError, IndexError):
        return None


def build_release_network(unet_config: Mapping[str, Any], audio_dim: int = RELEASE_AUDIO_DIM,
                          audio_tokens: int = RELEASE_AUDIO_TOKENS, device: str | torch.device = "meta",
                          **overrides: Any) -> EchoMimicV2Network:
    """The released architecture (on the meta device by default: shapes only, no memory)."""
    kwargs = {**release_network_kwargs(), **overrides}
    with torch.device(device):
        return EchoMimicV2Network(dict(unet_config), audio_dim, audio_tokens, **kwargs)


def network_from_release(release_dir: str | os.PathLike | None, unet_config: str | os.PathLike | None = None, *,
                         variant: str = "standard", audio_dim: int = RELEASE_AUDIO_DIM,
                         audio_tokens: int = RELEASE_AUDIO_TOKENS, latent_channels: int | None = None,
                         latent_factor: int = 8, key: str = "model.network.release_dir",
                         **overrides: Any) -> EchoMimicV2Network:
    """The released network with the release's weights (strict), e.g. to fine-tune it.

    Args:
        release_dir: the release's ``pretrained_weights/`` (config key ``key``).
        unet_config: ``sd-image-variations-diffusers/unet`` directory or its ``config.json``; ``None``:
            ``<release_dir>/sd-image-variations-diffusers/unet``.
        variant: ``"standard"`` or ``"acc"`` (``*_acc.pth`` denoiser and motion modules).
        audio_dim, audio_tokens, latent_channels, latent_factor: what the model's audio encoder and autoencoder
            give (the model passes them); they must fit the files (the release: 384, 50, 4 channels, factor 8).
    """
    if not release_dir:
        raise UserError(f"{key} is not set: expected the release's pretrained_weights/ directory")
    release_dir = Path(os.path.expanduser(str(release_dir)))
    cfg = read_unet_config(unet_config or release_dir / "sd-image-variations-diffusers" / "unet",
                           key.rsplit(".", 1)[0] + ".unet_config")
    if latent_channels is not None and latent_channels != cfg["in_channels"]:
        raise UserError(f"model.autoencoder gives {latent_channels} latent channels, the release's UNet takes "
                        f"{cfg['in_channels']} (use the sd-vae-ft-mse autoencoder)")
    files, names = read_release(release_dir, variant)
    widths = _pose_widths(files["pose_encoder"])
    if widths and 2 ** (len(widths) - 1) != latent_factor:
        raise UserError(f"model.autoencoder has spatial factor {latent_factor}, but {names['pose_encoder']} downsamples "
                        f"by {2 ** (len(widths) - 1)} (the release's: 8, sd-vae-ft-mse)")
    den = files["denoising_unet"]
    k2 = next((k for k in den if k.endswith(".attn2.to_k.weight")), None)
    if k2 is not None and den[k2].ndim == 2 and den[k2].shape[1] != audio_dim:
        raise UserError(f"model.audio_encoder gives {audio_dim}-dim features but {names['denoising_unet']}'s attn2 "
                        f"takes {den[k2].shape[1]} ({k2}); use the release's whisper-tiny features")
    if "pose_block_out_channels" not in overrides and widths:
        overrides["pose_block_out_channels"] = widths
    net = build_release_network(cfg, audio_dim, audio_tokens, latent_factor=latent_factor, **overrides)
    return load_release_into(net, files, names)


def export_release(net_or_state: EchoMimicV2Network | Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                   variant: str = "standard", dtype: torch.dtype | None = None) -> dict[str, Path]:
    """Write the release's four files into ``out_dir`` (each through a temporary file, then renamed)."""
    state = net_or_state.state_dict() if isinstance(net_or_state, torch.nn.Module) else net_or_state
    parts = to_release(state, dtype)
    out = Path(out_dir)
    written = {}
    for part, name in release_filenames(variant).items():
        with atomic_output(out / name) as tmp:
            torch.save(parts[part], tmp)
        written[part] = out / name
    return written


# ----------------------------------------------------------------------------------------------------- CLI


def _check_vae(path: Path) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (expected the sd-vae-ft-mse diffusers AutoencoderKL directory)")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{path / 'config.json'}: _class_name={cfg.get('_class_name')!r}, expected AutoencoderKL "
                        f"(sd-vae-ft-mse)")
    if not any((path / w).is_file() for w in UNET_WEIGHTS):
        raise UserError(f"{path}: no weights ({' or '.join(UNET_WEIGHTS)})")
    return {"path": str(path), "latent_channels": cfg.get("latent_channels")}


def _check_whisper(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing (expected the release's audio_processor/tiny.pt, OpenAI's whisper format)")
    try:
        from halfbody.models.whisper_openai import read_openai_checkpoint, openai_to_transformers
    except ImportError:  # the OpenAI-format loader is not there: record the file only
        return {"path": str(path), "checked": False}
    dims, sd = read_openai_checkpoint(path, str(path))
    openai_to_transformers(sd, dims, str(path))  # strict key / shape check
    return {"path": str(path), "checked": True, "dims": dict(dims)}


def import_release(release_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   unet_config: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                   whisper: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a release directory (both variants when the ``_acc`` files are there) and write
    ``<out>/network[_acc]/`` (:meth:`EchoMimicV2Network.save_pretrained`) and ``<out>/release.json``."""
    d = Path(os.path.expanduser(str(release_dir)))
    out = Path(out_dir)
    if not d.is_dir():
        raise UserError(f"--dir {str(d)!r}: not a directory (expected the release's pretrained_weights/)")
    cfg_path = Path(unet_config) if unet_config else d / "sd-image-variations-diffusers" / "unet"
    cfg = read_unet_config(cfg_path, "--unet-config")
    manifest: dict[str, Any] = {"source": str(d), "unet_config": str(cfg_path),
                                "vae": _check_vae(Path(vae) if vae else d / "sd-vae-ft-mse"),
                                "whisper": _check_whisper(Path(whisper) if whisper else d / "audio_processor" / "tiny.pt"),
                                "variants": {}}
    acc = [d / release_filenames("acc")[p] for p in ("denoising_unet", "motion_module")]
    variants = ["standard"]
    if any(p.exists() for p in acc):
        missing = [str(p) for p in acc if not p.exists()]
        if missing:
            raise UserError(f"{missing[0]}: missing (the accelerated variant needs both _acc files)")
        variants.append("acc")
    for variant in variants:
        files, names = read_release(d, variant)
        den = files["denoising_unet"]
        k2 = next((k for k in den if k.endswith(".attn2.to_k.weight")), None)
        audio_dim = int(den[k2].shape[1]) if k2 is not None and den[k2].ndim == 2 else RELEASE_AUDIO_DIM
        widths = _pose_widths(files["pose_encoder"]) or list(RELEASE_POSE_CHANNELS)
        net = load_release_into(build_release_network(cfg, audio_dim, pose_block_out_channels=widths), files, names)
        target = out / ("network" if variant == "standard" else "network_acc")
        net.save_pretrained(target)
        manifest["variants"][variant] = {"files": names, "network": str(target),
                                         "counts": release_parameter_counts(net),
                                         "trainable_parameters": sum(p.numel() for p in net.parameters())}
        del net, files
    with atomic_output(out / "release.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return manifest


def _state_from(network: str | None, checkpoint: str | None) -> dict[str, torch.Tensor]:
    if bool(network) == bool(checkpoint):
        raise UserError("export needs exactly one of --network (a save_pretrained directory) or --checkpoint "
                        "(a Lightning checkpoint of model=echomimic_v2)")
    if network:
        return dict(EchoMimicV2Network.from_pretrained(network, key="--network").state_dict())
    state = torch.load(checkpoint, map_location="cpu", weights_only=True) if Path(checkpoint).is_file() else None
    if state is None:
        raise UserError(f"--checkpoint {checkpoint!r}: no such file")
    sd = state.get("state_dict") if isinstance(state, Mapping) else None
    if not isinstance(sd, Mapping):
        raise UserError(f"--checkpoint {checkpoint!r}: not a Lightning checkpoint (no state_dict)")
    net = {k[len("network."):]: v for k, v in sd.items() if k.startswith("network.")}
    if not net:
        raise UserError(f"--checkpoint {checkpoint!r}: no network.* weights (not an EchoMimicV2 checkpoint: another "
                        f"model family's?)")
    return net


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halfbody.echomimic_v2.official", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="release files -> <out>/network[_acc]/ + release.json")
    imp.add_argument("--dir", required=True, help="the release's pretrained_weights/ directory")
    imp.add_argument("--out", required=True)
    imp.add_argument("--unet-config", default=None, help="default: <dir>/sd-image-variations-diffusers/unet")
    imp.add_argument("--vae", default=None, help="default: <dir>/sd-vae-ft-mse")
    imp.add_argument("--whisper", default=None, help="default: <dir>/audio_processor/tiny.pt")
    exp = sub.add_parser("export", help="a network trained here -> the release's .pth files")
    exp.add_argument("--network", default=None, help="a directory written by EchoMimicV2Network.save_pretrained")
    exp.add_argument("--checkpoint", default=None, help="a Lightning checkpoint of model=echomimic_v2")
    exp.add_argument("--out", required=True)
    exp.add_argument("--variant", choices=VARIANTS, default="standard")
    exp.add_argument("--dtype", choices=("float32", "float16"), default=None, help="default: as stored")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.cmd == "import":
            m = import_release(args.dir, args.out, args.unet_config, args.vae, args.whisper)
            for variant, v in m["variants"].items():
                counts = ", ".join(f"{p} {c['numel']:,} ({c['tensors']} tensors)" for p, c in v["counts"].items())
                print(f"{variant}: {v['network']}: {counts}")
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            for part, path in export_release(_state_from(args.network, args.checkpoint), args.out, args.variant,
                                             dtype).items():
                print(f"{part}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
