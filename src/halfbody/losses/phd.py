"""Phase-specific Denoising Loss (PhD Loss), EchoMimicV2 §3.5 Eq. 5, as the *extra* term added to ``L_latent``:

    L_PhD = lambda_pose   * L_pose   + L_latent   for t in S1   (pose-dominant,    noisiest 10%)
            lambda_detail * L_detail + L_latent   for t in S2   (detail-dominant,  next 60%)
            lambda_low    * L_low    + L_latent   for t in S3   (quality-dominant, last 30%)

with lambda = 0.1 each (§4.1). This module computes the bracketed pixel terms per sample; the caller adds its own
latent loss. For each sample it forms the one-step prediction ``x0_hat`` from the network's v-prediction
(``scheduler.predict_x0``), decodes it with the VAE decoder ``D`` (the expensive part), and applies the term of the
band its timestep falls in.

Work is skipped where it is not needed: only samples whose band has an active term (weight > 0) are decoded, in one
call, and a batch without any such sample calls neither the decoder nor an extractor. The schedule is data: a phase
spec can switch terms off (``weight: 0`` or removal: the Table 2 ablations "w/o L_pose / L_detail / L_low") or disable
the whole loss with :meth:`PhDLoss.configure`, without rebuilding anything.

Checkpoints: the frozen term networks (LPIPS backbone, pose extractor) are loaded from their own config paths, so
they are kept out of this module's ``state_dict`` (and not expected when loading one): switching a tiny stand-in for
a paper-scale extractor never changes a checkpoint's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from halfbody.losses.base import per_clip
from halfbody.losses.timestep_bands import TimestepBands

__all__ = ["PhDLoss", "PhDOutput", "PAPER_SCHEDULE", "parse_schedule"]

#: §4.1: band -> (term, weight).
PAPER_SCHEDULE: dict[str, tuple[str, float]] = {"S1": ("pose", 0.1), "S2": ("detail", 0.1), "S3": ("low", 0.1)}

_TERMS_PREFIX = "terms."


class _X0Predictor(Protocol):
    num_train_timesteps: int

    def predict_x0(self, x_t: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def parse_schedule(schedule: Mapping[str, Any] | None) -> dict[str, tuple[str, float]]:
    """``{band: (term, weight)}`` from ``{band: [term, weight]}`` or ``{band: {term: ..., weight: ...}}`` (Hydra
    lists / dicts); a ``None`` entry removes the band. ``None`` schedule: :data:`PAPER_SCHEDULE`."""
    if schedule is None:
        return dict(PAPER_SCHEDULE)
    out: dict[str, tuple[str, float]] = {}
    for band, spec in schedule.items():
        if spec is None:
            continue
        if isinstance(spec, Mapping):
            if set(spec) != {"term", "weight"}:
                raise ValueError(f"PhD schedule entry {band!r} must have keys term and weight, got {sorted(spec)}")
            term, weight = spec["term"], spec["weight"]
        else:
            try:
                term, weight = spec
            except (TypeError, ValueError):
                raise ValueError(f"PhD schedule entry {band!r} must be [term, weight], got {spec!r}") from None
        weight = float(weight)
        if weight < 0:
            raise ValueError(f"PhD schedule entry {band!r}: weight must be >= 0, got {weight}")
        out[str(band)] = (str(term), weight)
    return out


@dataclass
class PhDOutput:
    """``loss``: ``(B,)`` float32, ``sum_k lambda_k L_k`` for each sample (0 outside active bands), to be added to the
    per-sample latent loss. ``logs``: detached scalars with the same keys every step for a fixed schedule
    (``phd/<term>``: unweighted mean over the samples in its band, 0 when none; ``phd/<term>_n``: that count;
    ``phd/decoded``: clips decoded; ``phd/loss``: batch mean of ``loss``). ``decoded``: clips decoded this call."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    decoded: int = 0


class PhDLoss(nn.Module):
    """The PhD loss terms composed over timestep bands (EchoMimicV2 Eq. 5).

    Args:
        terms: term name -> pixel loss module (``forward(pred (N,3,H,W), target, valid) -> (N,)``), e.g.
            ``{"pose": PoseLoss(...), "detail": DetailLoss(), "low": LowLevelLoss(...)}``. Terms the schedule does
            not use may be absent.
        schedule: band -> ``(term, weight)``; default :data:`PAPER_SCHEDULE`. See :func:`parse_schedule`.
        bands: the :class:`TimestepBands` (default: the paper's 10 / 60 / 30 % of ``T = 1000``), or a mapping of
            band fractions for ``T = 1000``.
        enabled: master switch; off means no decode and a zero loss.
    """

    def __init__(self, terms: Mapping[str, nn.Module], schedule: Mapping[str, Any] | None = None,
                 bands: TimestepBands | Mapping[str, float] | None = None, enabled: bool = True) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.bands = bands if isinstance(bands, TimestepBands) else TimestepBands(fractions=bands)
        self.enabled = True
        self.schedule: dict[str, tuple[str, float]] = {}
        self.configure(schedule=schedule if schedule is not None else PAPER_SCHEDULE, enabled=enabled)
        self.register_state_dict_post_hook(_drop_term_weights)
        self.register_load_state_dict_pre_hook(_keep_current_term_weights)

    @classmethod
    def tiny(cls, schedule: Mapping[str, Any] | None = None, num_keypoints: int = 17,
             terms: Mapping[str, nn.Module] | None = None, **kwargs: Any) -> "PhDLoss":
        """CPU preset: Sobel detail loss, LPIPS(alex) with a RANDOM backbone and a random conv pose extractor (both
        labelled stand-ins by :meth:`describe`); no files needed. ``terms`` must be ``None`` (the config's
        ``terms: null``: the stand-ins are built here); ``schedule`` and ``bands`` as :class:`PhDLoss`."""
        if terms is not None:
            raise ValueError("PhDLoss.tiny builds its own stand-in terms: model.phd_loss.terms must be null")
        from halfbody.losses.detail import DetailLoss
        from halfbody.losses.lpips_loss import LowLevelLoss
        from halfbody.losses.pose_extractor import PoseLoss, RandomConvPoseExtractor

        terms = {"pose": PoseLoss(RandomConvPoseExtractor(num_keypoints)), "detail": DetailLoss(),
                 "low": LowLevelLoss("alex", stand_in=True)}
        return cls(terms, schedule=schedule, **kwargs)

    # ------------------------------------------------------------------------------------------------ config
    def validate_schedule(self, schedule: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
        """Parse ``schedule`` and check its bands and terms against this loss; raises a one-line ValueError."""
        parsed = parse_schedule(schedule)
        unknown_bands = sorted(set(parsed) - set(self.bands.names))
        if unknown_bands:
            raise ValueError(f"PhD schedule names bands {unknown_bands}; known: {list(self.bands.names)}")
        missing = sorted({term for term, w in parsed.values() if w > 0 and term not in self.terms})
        if missing:
            raise ValueError(f"PhD schedule uses terms {missing} with weight > 0 but only "
                             f"{sorted(self.terms)} were built")
        return parsed

    def configure(self, schedule: Mapping[str, Any] | None = None, enabled: bool | None = None) -> None:
        """Change the schedule and / or the master switch (a phase spec's loss settings); validated here."""
        if schedule is not None:
            self.schedule = self.validate_schedule(schedule)
        if enabled is not None:
            self.enabled = bool(enabled)

    @property
    def active(self) -> dict[str, tuple[str, float]]:
        """band -> (term, weight) for the bands that contribute (weight > 0), empty when disabled."""
        if not self.enabled:
            return {}
        return {band: tw for band, tw in self.schedule.items() if tw[1] > 0}

    def describe(self) -> str:
        """Multi-line summary for the training logs (names stand-ins as such)."""
        lines = [f"PhDLoss({'on' if self.enabled else 'OFF'}; {self.bands.describe()})"]
        for band in self.bands.names:
            term, weight = self.schedule.get(band, ("-", 0.0))
            module = self.terms[term] if term in self.terms else None
            what = module.describe() if module is not None and hasattr(module, "describe") else "off"
            state = "active" if band in self.active else "inactive"
            lines.append(f"  {band}: {term} x {weight:g} ({state}) {what if weight > 0 else ''}".rstrip())
        return "\n".join(lines)

    def needs_decode(self, t: torch.Tensor) -> torch.Tensor:
        """bool ``(B,)``: which samples fall in a band with an active term."""
        masks = self.bands.band_masks(t)
        need = torch.zeros_like(t, dtype=torch.bool)
        for band in self.active:
            need |= masks[band]
        return need

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor, target_pixels: torch.Tensor,
                decode: Callable[[torch.Tensor], torch.Tensor], scheduler: _X0Predictor,
                valid: torch.Tensor | None = None, t_host: Sequence[int] | None = None) -> PhDOutput:
        """The extra loss per sample.

        Args:
            x_t: noisy latents ``(B, F, C, h, w)``.
            v_pred: the network's v-prediction, same shape (with its graph: the loss trains through it).
            t: integer timesteps ``(B,)``.
            target_pixels: ``I_target``, the clip ``(B, F, 3, H, W)`` in ``[-1, 1]``.
            decode: latents ``(B', F, C, h, w)`` -> pixels ``(B', F, 3, H, W)`` (e.g. ``autoencoder.decode``);
                must keep the graph to its input.
            scheduler: gives ``predict_x0`` (one-step ``x0_hat``, §3.5) and ``num_train_timesteps``.
            valid: optional ``(B, F, 1, H, W)`` mask, 0 on padding.
            t_host: ``t`` as host integers (the training step draws them on the host): the samples to decode and
                each band's samples are then chosen without reading the device back (no host synchronisation).
        """
        if x_t.ndim != 5 or v_pred.shape != x_t.shape:
            raise ValueError(f"x_t and v_pred must both be (B, F, C, h, w), got {tuple(x_t.shape)} and "
                             f"{tuple(v_pred.shape)}")
        b, f = x_t.shape[:2]
        if t.shape != (b,):
            raise ValueError(f"t must be (B,) = ({b},), got {tuple(t.shape)}")
        if target_pixels.ndim != 5 or target_pixels.shape[:2] != (b, f) or target_pixels.shape[2] != 3:
            raise ValueError(f"target_pixels must be (B, F, 3, H, W) with B={b}, F={f}, got {tuple(target_pixels.shape)}")
        if valid is not None and (valid.shape[:3] != (b, f, 1) or valid.shape[-2:] != target_pixels.shape[-2:]):
            raise ValueError(f"valid must be (B, F, 1, H, W) like target_pixels, got {tuple(valid.shape)}")
        T = int(scheduler.num_train_timesteps)
        if T != self.bands.num_train_timesteps:
            raise ValueError(f"PhD bands are defined for T={self.bands.num_train_timesteps} but the scheduler has "
                             f"T={T}")

        active = self.active
        loss = torch.zeros(b, device=x_t.device, dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for term, _ in active.values():
            logs[f"phd/{term}"] = torch.zeros((), device=x_t.device)
            logs[f"phd/{term}_n"] = torch.zeros((), device=x_t.device)
        if t_host is not None:  # band membership from host integers
            t_host = [int(v) for v in t_host]
            if len(t_host) != b or not all(0 <= v < T for v in t_host):
                raise ValueError(f"t_host must be {b} integers in [0, {T}), got {t_host}")
            ranges = self.bands.ranges()
            in_band = {band: [lo <= v < hi for v in t_host] for band, (lo, hi) in ranges.items()}
            need_host = [i for i in range(b) if any(in_band[band][i] for band in active)]
            idx = torch.tensor(need_host, dtype=torch.long).to(x_t.device, non_blocking=True)
            selected = {band: [j for j, i in enumerate(need_host) if in_band[band][i]] for band in active}
            n_decoded = len(need_host)
        else:
            masks = self.bands.band_masks(t)
            idx = self.needs_decode(t).nonzero(as_tuple=True)[0]
            selected = {band: masks[band][idx].nonzero(as_tuple=True)[0] for band in active}
            n_decoded = int(idx.numel())
        if n_decoded:
            x0_hat = scheduler.predict_x0(x_t[idx], v_pred[idx], t[idx])  # one-step sampling (§3.5)
            pixels = decode(x0_hat)  # D(Z_0^t): the only decode of this step
            target = target_pixels[idx]
            if pixels.shape != target.shape:
                raise ValueError(f"decode returned {tuple(pixels.shape)} for latents {tuple(x0_hat.shape)}; "
                                 f"expected the target's {tuple(target.shape)}")
            sub_valid = None if valid is None else valid[idx]
            for band, (term, weight) in active.items():
                sel = selected[band]  # positions within the decoded sub-batch
                n_sel = len(sel)
                if not n_sel:
                    continue
                if not torch.is_tensor(sel):
                    sel = torch.tensor(sel, dtype=torch.long).to(x_t.device, non_blocking=True)
                frames = lambda x: x[sel].flatten(0, 1)  # (n, F, ...) -> (n F, ...)  # noqa: E731
                per_frame = self.terms[term](frames(pixels), frames(target),
                                             None if sub_valid is None else frames(sub_valid))
                value = per_clip(per_frame.float(), f)  # (n,)
                loss = loss.index_add(0, idx[sel], weight * value)
                logs[f"phd/{term}"] = logs[f"phd/{term}"] + value.detach().sum()
                logs[f"phd/{term}_n"] = logs[f"phd/{term}_n"] + n_sel
        for term, _ in active.values():
            n = logs[f"phd/{term}_n"]
            logs[f"phd/{term}"] = logs[f"phd/{term}"] / n.clamp_min(1.0)
        logs["phd/decoded"] = torch.tensor(float(n_decoded), device=x_t.device)
        logs["phd/loss"] = loss.detach().mean()
        return PhDOutput(loss=loss, logs=logs, decoded=n_decoded)


def _drop_term_weights(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: leave the frozen term networks out of checkpoints."""
    for k in [k for k in state_dict if k.startswith(prefix + _TERMS_PREFIX)]:
        del state_dict[k]


def _keep_current_term_weights(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: the term networks are not in checkpoints (and a stray copy in one must not replace the weights
    loaded from their config paths), so feed each term tensor its current value."""
    for k in [k for k in state_dict if k.startswith(prefix + _TERMS_PREFIX)]:
        del state_dict[k]
    for k, v in module.terms.state_dict().items():
        state_dict[prefix + _TERMS_PREFIX + k] = v
