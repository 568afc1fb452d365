"""Two-process (gloo, CPU) DDP training through the Trainer: negatives gathered across ranks, GradCache with
no_sync, gradient accumulation; the ranks' LoRA weights stay identical."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .test_contrastive import _triplet_csv


@pytest.mark.slow
def test_two_process_supervised_gradcache_stays_in_sync(tiny_model_dir, tmp_path):
    files = [_triplet_csv(tmp_path / "one.csv", 1), _triplet_csv(tmp_path / "two.csv", 5)]
    out = tmp_path / "out"
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(worker), tiny_model_dir, *files, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ((out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == "DistributedDataParallel"
    assert r0[1] == r1[1]  # same initial adapter on both ranks
    assert r0[2] == r1[2] and r0[2] != r0[1]  # trained, and identically on both ranks
