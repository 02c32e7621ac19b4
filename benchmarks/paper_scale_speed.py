"""Paper-scale speed and memory of both families on one GPU, random weights (issue 13 §4); ``make bench-paper``.

    python benchmarks/paper_scale_speed.py --size paper --device cuda            # one GPU, bf16, at most ~8 minutes
    python benchmarks/paper_scale_speed.py                                       # CPU, tiny presets (the slow test)
    python benchmarks/paper_scale_speed.py --size paper --compile                # compiled blocks (parallelize.compile)

Rows:

- **Training step** of ``apdh_stage1`` (EchoMimicV2: 768^2, batch 4, PhD loss with its VAE decode, the recipe's
  activation checkpointing) and ``mirrorme_stage2`` (121 x 768 x 512, batch 1): the experiment composed as
  ``halfbody.train`` composes it, its first phase applied, the pretrained parts built from their published
  architectures with random weights (``halfbody.utils.memory_model.pretrained_architectures``), bf16 autocast with
  fp32 weights and AdamW (``trainer=gpu``). Seconds per optimizer step (best of ``--steps`` after a warm-up),
  FLOPs per step counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward), MFU against the device's
  dense bf16 peak (:data:`PEAK_TFLOPS`), and the memory: ``torch.cuda.max_memory_allocated`` next to the estimator's
  prediction for the same configuration (``python -m halfbody.memory experiment=<name> trainer=gpu``).
- **Generation FPS** through ``benchmarks/generation_fps.py`` (what ``python -m halfbody.generate`` runs per video):
  MirrorMe 121 x 768 x 512, 15 Euler steps, CFG 2.5, both CFG branches in one batch (paper: 24.33 FPS; target >= 40);
  EchoMimicV2 768^2, 36 frames, 30 DDIM steps + CFG 2.5 (``release``) and the 6-step ``release_acc``.

Writes ``--out`` (JSON) and ``--markdown`` (a section for benchmarks/RESULTS.md) with device, date and command. Tiny
sizes run the CPU presets (``preset=tiny_cpu``) at 64^2 so the whole script is checked in the slow test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: dense (no sparsity) bf16 tensor-core peak per device, TFLOP/s (vendor data sheets); matched on the device name
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0,
               "RTX 6000 Ada": 364.0, "B200": 2250.0}
TRAIN_EXPERIMENTS = ("apdh_stage1", "mirrorme_stage2")


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key]
    return None


def compose(experiment: str, size: str, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from halfbody.utils.hydra import CONFIG_DIR

    GlobalHydra.instance().clear()
    overrides = [f"experiment={experiment}", "trainer=gpu" if size == "paper" else "trainer=cpu", *extra]
    if size == "tiny":
        overrides.append("preset=tiny_cpu")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def training_row(experiment: str, size: str, device: str, bf16: bool, steps: int, compile_blocks: bool,
                 batch: int | None) -> dict:
    import hydra

    from halfbody.utils import memory_model as mm

    extra = [f"data.batch_size={batch}"] if batch else []
    if compile_blocks:
        extra.append("parallelize.compile=true")
    cfg = compose(experiment, size, extra)
    shape = mm.phase_shapes(cfg)[0]
    predicted = None
    if device.startswith("cuda"):
        (est,) = mm.estimate(cfg, phases=[shape.name])
        predicted = est.total
    torch.manual_seed(0)
    with mm.pretrained_architectures(), torch.device(device):
        module = hydra.utils.instantiate(mm._module_config(cfg))
    module = module.to(device)
    if cfg.get("parallelize") is not None:
        module.parallelism = hydra.utils.instantiate(cfg.parallelize)
        module.configure_model()  # activation checkpointing / compile as the experiment ships them (no mesh here)
    if shape.spec is not None:
        module.apply_phase(shape.spec)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch_t = mm.training_batch(module, shape.batch_size, shape.num_frames, shape.resolution, shape.fps, device=device,
                                generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def step(i: int) -> None:
        with amp:
            loss, _ = module.diffusion_loss(batch_t, generator=torch.Generator(device).manual_seed(i), training=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    step(0)  # warm-up: kernels, allocator, optimizer state
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        sync()
        start = time.perf_counter()
        step(2 + i)
        sync()
        times.append(time.perf_counter() - start)
    measured = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    res = shape.resolution
    row = {"experiment": experiment, "phase": shape.name, "batch": shape.batch_size, "frames": shape.num_frames,
           "resolution": res if isinstance(res, int) else list(res), "dtype": "bf16" if bf16 else "fp32",
           "trainable_params": sum(p.numel() for p in params), "seconds_per_step": min(times),
           "tflops_per_step": flops / 1e12, "achieved_tflops": flops / min(times) / 1e12,
           "activation_checkpointing": bool(cfg.parallelize.activation_checkpointing),
           "compile": compile_blocks, "memory_measured_gib": None if measured is None else measured / 2**30,
           "memory_predicted_gib": None if predicted is None else predicted / 2**30}
    return row  # the module and optimizer go with this frame (the caller empties the CUDA cache)


def generation_rows(size: str, device: str, bf16: bool, steps: int | None, compile_blocks: bool) -> list[dict]:
    import generation_fps as gen  # benchmarks/generation_fps.py: the same builds and timing as make bench-generate

    rows = []
    paper = size == "paper"
    with tempfile.TemporaryDirectory() as tmp:
        for family, variants in gen.VARIANTS.items():
            frames = 36 if family == "echomimic_v2" else (121 if paper else 17)
            height = 768 if paper else 64
            width = (512 if family == "mirrorme" else 768) if paper else 64
            for variant, overrides in variants:
                model, _ = gen.build(family, size, overrides, Path(tmp))
                model = model.to(device).eval().requires_grad_(False)
                if compile_blocks:
                    from halfbody.models.parallel import Parallelism

                    model.parallelism = Parallelism(compile=True)
                    model.configure_model()
                times, n_steps, scale = gen.run_variant(model, frames, height, width, 25.0, device, bf16, 1,
                                                        steps, None)
                rows.append({"family": family, "variant": variant, "frames": frames, "height": height, "width": width,
                             "steps": n_steps, "cfg": scale, "dtype": "bf16" if bf16 else "fp32",
                             "compile": compile_blocks, "seconds": min(times), "fps": frames / min(times)})
                del model
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def markdown(result: dict) -> str:
    lines = [f"### Paper-scale speed ({result['size']}), {result['date']}, {result['device']}", "",
             f"`{result['command']}` (commit {result['commit']}; random weights)", "",
             "| training step | phase | batch x frames x size | dtype | AC | s/step | TFLOP/step | TFLOP/s | MFU | "
             "memory measured / predicted (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        res = r["resolution"] if isinstance(r["resolution"], int) else "x".join(map(str, r["resolution"]))
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        mem = ("n/a" if r["memory_measured_gib"] is None
               else f"{r['memory_measured_gib']:.1f} / {r['memory_predicted_gib']:.1f}")
        lines.append(f"| {r['experiment']} | {r['phase']} | {r['batch']} x {r['frames']} x {res} | {r['dtype']} | "
                     f"{'on' if r['activation_checkpointing'] else 'off'} | {r['seconds_per_step']:.3f} | "
                     f"{r['tflops_per_step']:.3g} | {r['achieved_tflops']:.3g} | {mfu} | {mem} |")
    lines += ["", "| generation | variant | frames x H x W | steps | CFG | dtype | compiled | seconds | FPS |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["generation"]:
        lines.append(f"| {r['family']} | {r['variant']} | {r['frames']}x{r['height']}x{r['width']} | {r['steps']} | "
                     f"{r['cfg']:g} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | {r['seconds']:.2f} | "
                     f"{r['fps']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: paper bf16, tiny fp32")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default: paper 3, tiny 1)")
    ap.add_argument("--batch", type=int, default=None, help="training batch per GPU (default: the experiment's)")
    ap.add_argument("--gen-steps", type=int, default=None, help="sampling steps (default: each variant's 30 / 6 / 15)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the family's blocks (parallelize.compile)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: training, generation")
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "paper_scale_speed.json")
    ap.add_argument("--markdown", type=Path, default=None, help="default: --out with .md")
    args = ap.parse_args(argv)
    bf16 = (args.dtype or ("bf16" if args.size == "paper" else "fp32")) == "bf16"
    steps = args.steps or (3 if args.size == "paper" else 1)
    skip = set(filter(None, args.skip.split(",")))
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    peak = peak_tflops(device_name) if cuda else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    result = {"size": args.size, "device": device_name, "peak_bf16_tflops": peak, "commit": commit,
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              "command": "python benchmarks/paper_scale_speed.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "training": [], "generation": []}
    start = time.perf_counter()
    if "training" not in skip:
        for experiment in TRAIN_EXPERIMENTS:
            try:
                row = training_row(experiment, args.size, args.device, bf16, steps, args.compile, args.batch)
            except torch.cuda.OutOfMemoryError as e:  # recorded, not fatal: the other rows still run
                row = {"experiment": experiment, "error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            if cuda:
                torch.cuda.empty_cache()
            if peak and "achieved_tflops" in row:
                row["mfu"] = row["achieved_tflops"] / peak
            result["training"].append(row)
            print(json.dumps(row), flush=True)
    if "generation" not in skip:
        result["generation"] = generation_rows(args.size, args.device, bf16, args.gen_steps, args.compile)
        for row in result["generation"]:
            print(json.dumps(row), flush=True)
    result["seconds"] = time.perf_counter() - start
    result["training"] = [r for r in result["training"] if "error" not in r] + \
                         [r for r in result["training"] if "error" in r]
    from halfbody.utils.io import atomic_output

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    md = args.markdown or args.out.with_suffix(".md")
    ok = {**result, "training": [r for r in result["training"] if "error" not in r]}
    text = markdown(ok) + "".join(f"\n{r['experiment']}: {r['error']}\n" for r in result["training"] if "error" in r)
    with atomic_output(md) as tmp:
        tmp.write_text(text)
    print(text)
    print(f"written {args.out} and {md} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
