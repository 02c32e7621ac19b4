"""Cost of EchoMimicV2's PhD loss (§3.5) per training step: latent loss alone vs latent loss + PhD terms.

Builds the tiny EchoMimicV2 network with the lossless patch autoencoder and runs full training steps (forward,
backward, AdamW step) on random clips, in one process, interleaving the variants so that machine load affects them
alike:

- ``latent``: the v-prediction latent MSE only;
- ``latent+phd``: plus :class:`halfbody.losses.PhDLoss` with the paper schedule (S1 pose / S2 detail / S3 LPIPS,
  weight 0.1), timesteps uniform in ``[0, T)``: every sample is in an active band, so every clip is decoded;
- ``latent+phd[S1|S2|S3]``: all timesteps forced into one band, i.e. the cost of each term alone.

The tiny preset's terms are stand-ins (random LPIPS backbone, random conv pose extractor): the same compute shape as
AlexNet-LPIPS, a smaller pose network than DWPose. The patch autoencoder's decode is a reshape, so the decoder cost of
an SD VAE (the dominant PhD cost at paper scale) is *not* represented here.

    python benchmarks/phd_decode_cost.py [--batch 2 --frames 8 --resolution 64 --steps 10 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from halfbody.echomimic_v2.network import EchoMimicV2Network
    from halfbody.losses import PhDLoss, TimestepBands
    from halfbody.models.autoencoders import PatchAutoencoder
    from halfbody.models.schedulers import VPredictionDDIM

    b, f, res = args.batch, args.frames, args.resolution
    ae = PatchAutoencoder(patch_size=4)
    audio_dim, audio_tokens = 384, 10
    net = EchoMimicV2Network.tiny(latent_channels=ae.latent_channels, latent_factor=ae.spatial_factor,
                                  audio_dim=audio_dim, audio_tokens=audio_tokens)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    sched = VPredictionDDIM()
    phd = PhDLoss.tiny()
    bands = TimestepBands(sched.num_train_timesteps)

    g = torch.Generator().manual_seed(0)
    video = torch.rand(b, f, 3, res, res, generator=g) * 2 - 1
    ref = torch.rand(b, 3, res, res, generator=g) * 2 - 1
    pose = torch.rand(b, f, 3, res, res, generator=g)
    audio = torch.randn(b, f, audio_tokens, audio_dim, generator=g)
    with torch.no_grad():
        x0, ref_lat = ae.encode(video), ae.encode_image(ref)

    def step(variant: str) -> float:
        start = time.perf_counter()
        noise = torch.randn_like(x0)
        if variant.startswith("latent+phd["):
            lo, hi = bands.ranges()[variant[-3:-1]]
            t = sched.sample_timesteps(b, t_min=lo, t_max=hi)
        else:
            t = sched.sample_timesteps(b)
        x_t = sched.add_noise(x0, noise, t)
        v = net(x_t, t, ref_lat, audio, pose)
        loss = (v.float() - sched.velocity_target(x0, noise, t).float()).square().mean()
        if variant != "latent":
            out = phd(x_t, v, t, video, ae.decode, sched)
            loss = loss + out.loss.mean()  # Eq. 5: lambda * L_term + L_latent, averaged over the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    variants = ["latent", "latent+phd", "latent+phd[S1]", "latent+phd[S2]", "latent+phd[S3]"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(2):  # warm-up
        for v in variants:
            step(v)
    for _ in range(args.steps):
        for v in variants:  # interleaved: load changes hit every variant alike
            times[v].append(step(v))

    cmd = "python benchmarks/phd_decode_cost.py " + " ".join(sys.argv[1:])
    print(f"command: {cmd.strip()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; B={b}, F={f}, {res}x{res}, "
          f"latents {tuple(x0.shape)}, {args.steps} timed steps per variant")
    print(phd.describe())
    base = statistics.median(times["latent"])
    print(f"{'variant':<18} {'median ms/step':>15} {'ratio vs latent':>16}")
    for v in variants:
        med = statistics.median(times[v])
        print(f"{v:<18} {1000 * med:>15.1f} {med / base:>16.2f}")


if __name__ == "__main__":
    main()
