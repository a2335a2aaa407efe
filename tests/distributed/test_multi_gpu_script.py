"""scripts/multi_gpu.py runs its cells and compares their weights (a CPU smoke run: one process,
a tiny model): SFT ends with the same weights under ddp and fsdp2, and TRPO's refusal of fsdp2
is reported as a failed cell, not a crash of the table."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cells_run_and_compare_weights(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts/multi_gpu.py"), "--tiny", "--accelerator", "cpu", "--devices", "1",
        "--strategies", "ddp", "fsdp2", "--algorithms", "sft", "trpo", "--compare", "--steps", "2", "--warmup", "0",
        "--workdir", str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # the TRPO / fsdp2 cell fails
    assert "trpo / fsdp2: [rank0]: ValueError: TRPOModule computes its step on whole parameters" in result.stdout
    sft, trpo = result.stdout.splitlines()[-2:]  # the table's rows: "<algorithm>  <time> s (<gap>) ..."
    gaps = [float(cell.strip("()")) for cell in sft.split()[1:] if cell.startswith("(")]
    print(f"\nSFT, largest weight difference to ddp: {gaps}")
    assert sft.startswith("sft") and gaps[0] == 0.0 and len(gaps) == 2 and gaps[1] < 1e-6
    assert trpo.startswith("trpo") and trpo.split()[-1] == "FAILED" and "(0.0e+00)" in trpo
