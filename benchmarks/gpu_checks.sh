#!/usr/bin/env bash
# The GPU benchmarks in one command, sized for a short lease on one H100/H200 (about 10 min):
#
#     bash benchmarks/gpu_checks.sh            # logs into $OUT (default: gpu-results/)
#
# 1. the card's own bf16 matrix-product rate (8192^3), the ceiling the next line is read against;
# 2. SiT-B/2 forward under bf16 autocast at batch 256 (256-px tiles), ours vs diffusers' DiT-B/2;
# 3. a 2 cm² slide at 0.5 µm/px from file to finished OME-Zarr with a random-weight SiT-B/2,
#    8 steps, with the share of the wall time the GPU was busy (NVML), with windows on glass
#    sampled and skipped side by side;
# 4. the forward pass again through torch.compile.
# Where the project's packages are not installed (a bare GPU host), wheels in .whl/ are
# installed into /tmp/site first. Each step has its own time limit, so one failing step
# leaves the others' figures.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 60 python3 - <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); s = (time.perf_counter() - t) / 10
print(f"bf16 matmul 8192^3: {2 * 8192**3 / s / 1e12:.0f} TFLOP/s measured (torch {torch.__version__}, {torch.cuda.get_device_name()})")
PY
timeout 150 python3 benchmarks/sit_forward.py --device cuda --dtype bfloat16 --batch 256 2>&1 | tee "$OUT/sit_forward_bf16_b256.txt"
timeout 480 python3 benchmarks/slide_end_to_end.py --random-sit B/2 --device cuda --sizes 28284 --steps 8 \
    --batch-size 256 --block-px 4096 --glass both --workdir /tmp/mupad-e2e 2>&1 | tee "$OUT/slide_end_to_end_b2_cuda.txt"
timeout 150 python3 benchmarks/sit_forward.py --device cuda --dtype bfloat16 --batch 256 --no-dca --compile 2>&1 \
    | tee "$OUT/sit_forward_bf16_b256_compile.txt"
