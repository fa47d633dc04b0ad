#!/usr/bin/env bash
# One run of the GPU benchmark on a machine whose Python has torch but not webui's transformers (the
# lent H100/H200 machines have transformers 5.17 and tokenizers 0.23): webui's transformers 5.6.2 and a
# tokenizers it accepts travel as wheels in .whl/ (git-ignored), fetched beforehand with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.6.2 tokenizers==0.22.2
# Usage there: bash bench/device_run.sh [bench_gpu.py options]   (the log goes to $OUT, else /tmp)
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
