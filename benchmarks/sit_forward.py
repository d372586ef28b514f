#!/usr/bin/env python
"""Forward-pass benchmark: our SiT-B/2 against diffusers' DiT-B/2.

    python benchmarks/sit_forward.py [--batch 4] [--latent 32] [--repeats N]
                                     [--threads T] [--device cpu|cuda]
                                     [--dtype float32|bfloat16]

Models, all built in this process, in eval mode, under torch.inference_mode, with
random N(0, 0.02) weights (so no zero-initialised gate makes any work trivial):

- ours:      `MupadSiT.from_preset("B", in_channels=4, condition_dims=None)`,
             called as `model(x, t)` with t in [0, 1);
- diffusers: `DiTTransformer2DModel` with the same width (768), depth (12), heads
             (12 x 64), patch size 2, 4 -> 4 channels, `sample_size` = the latent size
             and `num_embeds_ada_norm=1000` (class-conditional adaLN-Zero, the DiT
             design), called with random class labels and integer timesteps in 0..999;
- ours + DCA (extra lines): ours with the Decoupled Cross-Attention streams active,
             `condition_dims={"image": 384, "text": 384}`, 256 image tokens and 32
             text tokens, both present for every sample.

All see the same latent x. After warm-up, timed repetitions are interleaved (one
call of each model per round, the order reversed every other round) so that machine
noise (other processes, frequency changes) hits every model alike. Reported per
model: median and IQR of the wall time of one forward call, parameters, FLOPs (counted
once with torch.utils.flop_counter.FlopCounterMode) and achieved GFLOP/s.

The last line printed is the headline `sit_b2_vs_diffusers_dit_speed: R` with
R = median diffusers time / median ours time (R > 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from torch.utils import flop_counter

HEADLINE = "sit_b2_vs_diffusers_dit_speed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--latent", type=int, default=32, help="latent side; 32 = 256-px, 64 = 512-px tiles (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per model (default 10 on cpu, 30 on cuda)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per model after the FLOP-count call (default 1 on cpu, 3 on cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the CPUs available to this process)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 runs the models under bf16 autocast (weights stay fp32)")
    p.add_argument("--no-dca", action="store_true", help="skip the ours + condition streams lines")
    p.add_argument("--compile", action="store_true",
                   help="time every model through torch.compile (FLOPs still counted eagerly; compiling is warm-up)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler op table per model")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.latent % 2 or args.latent < 2:
        p.error("--latent must be a positive multiple of the patch size 2")
    if args.batch < 1 or (args.repeats is not None and args.repeats < 1):
        p.error("--batch and --repeats must be at least 1")
    if args.repeats is None:
        args.repeats = 30 if args.device == "cuda" else 10
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    if args.threads is None:
        args.threads = available_cpus()
    return args


def compiled_call(model: torch.nn.Module, call):
    """`call` with `model`'s forward swapped for its torch.compile'd version."""
    model.forward = torch.compile(model.forward)
    return call


# -- machine ---------------------------------------------------------------------------
def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(args) -> list[str]:
    import diffusers

    cpus = available_cpus()
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"command: {shlex.join(getattr(sys, 'orig_argv', [sys.executable, *sys.argv]))}",
        f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, {cpus} available to this process)",
        f"torch: {torch.__version__} (threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()})"
        f"  diffusers: {diffusers.__version__}  python: {platform.python_version()}  os: {platform.platform()}",
    ]
    if args.device == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name()} (cuda {torch.version.cuda})")
    if args.compile:
        lines.append("compiled: torch.compile (default mode) for every model")
    if hasattr(os, "getloadavg"):
        lines.append("load average (1/5/15 min) at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    lines += contention_note(args.threads, cpus)
    return lines


def busy_cores_elsewhere(seconds: float = 0.5) -> float | None:
    """CPU cores kept busy by other processes while this one sleeps (None off Linux)."""

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def contention_note(threads: int, cpus: int, cpu_use: float | None = None) -> list[str]:
    """A warning when other processes compete for the CPU, seen now or (cpu_use) while timing."""
    busy = busy_cores_elsewhere()
    now = busy is not None and busy >= 0.25 and threads + busy > cpus + 0.25
    starved = cpu_use is not None and cpu_use < 0.8 * min(threads, cpus)
    if not (now or starved):
        return []
    seen = []
    if starved:
        seen.append(f"this process got {cpu_use:.2f} cores for its {threads} thread(s) while timing")
    if now:
        seen.append(f"other processes kept {busy:.1f} of {cpus} cores busy")
    if threads > 1:
        why = ("each parallel op can wait for a descheduled worker, which inflates times (more for the model "
               "with more small ops); compare with --threads 1 or rerun when the machine is quiet")
    else:
        why = "times are inflated and noisier; rerun when the machine is quiet"
    return [f"note: {'; '.join(seen)}: {why}."]


# -- models ----------------------------------------------------------------------------
def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def build_ours(condition_dims=None):
    from mupad_core.models.sit import MupadSiT

    return MupadSiT.from_preset("B", in_channels=4, condition_dims=condition_dims)


def build_diffusers(latent: int):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=12,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=latent,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def n_params(model, skip=()) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not any(s in name for s in skip))


# Per-block / shared timestep (+ class) embedders; what remains is the transformer proper.
OURS_EMBEDDERS = ("t_embedder.",)
DIFFUSERS_EMBEDDERS = (".norm1.emb.",)


# -- FLOPs -----------------------------------------------------------------------------
def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels; teach it the CPU flash kernel."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> tuple[int, torch.Tensor]:
    _register_cpu_sdpa_flops()
    with flop_counter.FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


# -- timing ----------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (
        (lambda: torch.autocast(device_type=args.device, dtype=torch.bfloat16))
        if args.dtype == "bfloat16"
        else contextlib.nullcontext
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"# SiT-B/2 forward: ours vs diffusers DiT-B/2, batch {args.batch}, latent {args.latent}x{args.latent} "
          f"({args.latent * 8}-px tiles), {args.device} {args.dtype}")
    for line in machine_lines(args):
        print(line)
    t_start = time.perf_counter()

    torch.manual_seed(args.seed)
    b, s = args.batch, args.latent
    x = torch.randn(b, 4, s, s)
    t = torch.rand(b)
    timestep = torch.randint(0, 1000, (b,))
    labels = torch.randint(0, 1000, (b,))
    x, t, timestep, labels = (v.to(device) for v in (x, t, timestep, labels))

    ours = randomise_(build_ours(), args.seed).to(device).eval()
    theirs = randomise_(build_diffusers(s), args.seed).to(device).eval()
    models = {  # name -> (model, call, params, params without embedders)
        "ours SiT-B/2": (ours, lambda: ours(x, t).velocity,
                         n_params(ours), n_params(ours, OURS_EMBEDDERS)),
        "diffusers DiT-B/2": (theirs, lambda: theirs(x, timestep=timestep, class_labels=labels).sample,
                              n_params(theirs), n_params(theirs, DIFFUSERS_EMBEDDERS)),
    }
    if not args.no_dca:
        from mupad_core.models.conditions import Conditions

        dca = randomise_(build_ours({"image": 384, "text": 384}), args.seed).to(device).eval()
        conds = Conditions(
            tokens={"image": torch.randn(b, 256, 384), "text": torch.randn(b, 32, 384)},
            presence={"image": torch.ones(b), "text": torch.ones(b)},
        ).to(device)
        models["ours SiT-B/2 + DCA (image 256 + text 32 tokens)"] = (
            dca, lambda: dca(x, t, conditions=conds).velocity, n_params(dca), n_params(dca, OURS_EMBEDDERS))

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    flops: dict[str, int] = {}
    with torch.inference_mode():
        # One FLOP-counting call per model (also the first warm-up), then plain warm-up.
        for name in names:
            with autocast():
                flops[name], out = count_flops(models[name][1])
            assert out.shape == x.shape, (name, out.shape)
            assert torch.isfinite(out.float()).all(), name
        if args.compile:
            models = {name: (model, compiled_call(model, call), *rest) for name, (model, call, *rest) in models.items()}
        for _ in range(args.warmup):
            for name in names:
                with autocast():
                    models[name][1]()
        sync()

        cpu0, wall0 = time.process_time(), time.perf_counter()
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                call = models[name][1]
                with autocast():
                    sync()
                    t0 = time.perf_counter()
                    out = call()
                    sync()
                    times[name].append(time.perf_counter() - t0)
                del out
        cpu_use = (time.process_time() - cpu0) / (time.perf_counter() - wall0)

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            for name in names:
                with autocast(), profile(activities=acts, record_shapes=True) as prof:
                    models[name][1]()
                    sync()
                print(f"\n## profile: {name}")
                print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=20))

    # -- report ------------------------------------------------------------------------
    stats = {}
    for name in names:
        ms = np.asarray(times[name]) * 1e3
        q1, med, q3 = np.percentile(ms, [25, 50, 75])
        stats[name] = (med, q3 - q1)

    print(f"\nrepeats: {args.repeats} interleaved rounds after {args.warmup} + 1 (FLOP-count) warm-up call(s) "
          f"per model; threads {torch.get_num_threads()}, process CPU use while timing {cpu_use:.2f} cores")
    width = max(len(n) for n in names)
    print(f"{'model':<{width}}  {'params (M)':>10}  {'w/o t-emb (M)':>13}  {'median ms':>10}  {'IQR ms':>8}  "
          f"{'GFLOP':>7}  {'GFLOP/s':>8}")
    for name in names:
        med, iqr = stats[name]
        _, _, p_all, p_core = models[name]
        gflop = flops[name] / 1e9
        print(f"{name:<{width}}  {p_all / 1e6:>10.2f}  {p_core / 1e6:>13.2f}  {med:>10.1f}  {iqr:>8.1f}  "
              f"{gflop:>7.1f}  {gflop / (med / 1e3):>8.1f}")

    ours_name, theirs_name = names[0], names[1]
    p_ours, p_theirs = models[ours_name][2], models[theirs_name][2]
    print(f"params: diffusers/ours = {p_theirs / p_ours:.3f} (diffusers keeps a timestep+class embedder in each of "
          f"the 12 blocks; without the embedders: {models[theirs_name][3] / models[ours_name][3]:.3f})")
    paired = np.asarray(times[theirs_name]) / np.asarray(times[ours_name])
    print(f"paired per-round ratio diffusers/ours: median {np.median(paired):.3f} "
          f"(min {paired.min():.3f}, max {paired.max():.3f})")
    if not args.no_dca:
        dca_name = names[2]
        print(f"condition streams (DCA, image+text): {stats[dca_name][0] / stats[ours_name][0]:.3f}x ours time, "
              f"{flops[dca_name] / flops[ours_name]:.3f}x ours FLOPs")
    if hasattr(os, "getloadavg"):
        print("load average (1/5/15 min) at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    if device.type == "cpu":
        for line in contention_note(args.threads, available_cpus(), cpu_use):
            print(line)
    noisy = {n: iqr / med for n, (med, iqr) in stats.items() if iqr > 0.1 * med}
    if noisy:
        print("note: noisy timings (IQR/median: " + ", ".join(f"{n} {100 * v:.0f}%" for n, v in noisy.items())
              + "); the paired ratio is the steadier figure; rerun on a quieter machine or with more --repeats")
    print(f"wall time of the whole run: {time.perf_counter() - t_start:.0f} s")
    ratio = stats[theirs_name][0] / stats[ours_name][0]
    print(f"{HEADLINE}: {ratio:.2f}")


if __name__ == "__main__":
    main()
