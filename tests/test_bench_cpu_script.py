"""bench/bench_cpu.py still runs and reports the issue's keys (toy shapes: its timings mean nothing here,
but its exactness checks do). Speed itself is judged from the script's real run, never in tests."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

ISSUE_KEYS = ("encode_fp32_ratio", "encode_bf16_ratio", "preprocess_ratio", "preprocess_max_abs_diff",
              "cached_followup_ratio", "text_turn_overhead_ms")


def test_bench_cpu_tiny_run_reports_every_key(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "bench" / "bench_cpu.py"), "--tiny", "--reps", "1", "--bf16-reps", "1",
               "--preprocess-reps", "1", "--text-reps", "2", "--tmp", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    for key in ISSUE_KEYS + ("encode_fp32_matmul_floor_ratio", "followup_overhead_ms", "cached_followup_ratio_by_parts"):
        assert isinstance(result[key], float), key
    assert set(result["targets_met"]) == set(ISSUE_KEYS)
    # Exact paths stay exact on the toy shapes too.
    assert result["encode_fp32_max_abs_diff"] == 0.0
    assert result["preprocess_max_abs_diff"] == 0.0 and result["preprocess_pad_max_abs_diff"] == 0.0


def test_bench_families_tiny_run_reports_a_row_per_family(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "bench" / "bench_cpu.py"), "--tiny", "--only", "families",
               "--families", "vipllava,pixtral,mistral3", "--family-reps", "1", "--tmp", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = json.loads(finished.stdout.strip().splitlines()[-1])["families"]
    assert set(rows) == {"vipllava", "pixtral", "mistral3"}
    for name, row in rows.items():
        assert row["max_abs_diff"] == 0.0, name  # exact on the toy shapes too
        assert isinstance(row["ratio"], float) and row["feature_rows"] > 0, name
    # Pixtral keeps the 4:3 aspect (64x48 px at 8 px patches); Mistral 3 merges 2x2 patches.
    assert (rows["pixtral"]["feature_rows"], rows["pixtral"]["prompt_positions"]) == (48, 54)
    assert (rows["mistral3"]["feature_rows"], rows["mistral3"]["prompt_positions"]) == (12, 15)
