#!/usr/bin/env bash
# One device-machine run of the GPU benchmark (the `device` tool's H100/H200 image: Python 3.12 with
# torch, but transformers 5.17 and tokenizers 0.23, so webui's transformers 5.6.2 and the tokenizers it
# accepts travel as wheels in .whl/; see bench/README or the root README's benchmark section).
# Usage there: bash bench/device_run.sh   (writes logs under $OUT when set, else under /tmp)
set -o pipefail
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
lscpu | grep -E "Model name|^CPU\(s\)" ; grep -o -m1 -w sha_ni /proc/cpuinfo
python3 - <<'PY'
import hashlib, time, torch, transformers, tokenizers
print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)
data = b"x" * (2_400_000)
start = time.perf_counter()
for _ in range(50):
    hashlib.sha256(data).hexdigest()
print(f"sha256 of 2.4 MB: {(time.perf_counter() - start) / 50 * 1000:.2f} ms")
PY
export PYTHONUNBUFFERED=1
timeout ${BENCH_TIMEOUT:-420} python3 bench/bench_gpu.py "$@" 2>&1 | tee "$out/bench_gpu.log"
