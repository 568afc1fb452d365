"""Two-process (gloo, CPU) DDP training through the Trainer: negatives gathered across ranks, GradCache with
no_sync, gradient accumulation; the ranks' LoRA weights stay identical. Evaluation during training: process 0
scores, both processes take the same early-stopping decision."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .test_contrastive import _triplet_csv


def _torchrun(worker, *args):
    """Run ``worker`` on two processes; fails the test on an error or after 240 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(Path(__file__).with_name(worker)), *args]
    # own process group: on a timeout the launcher's workers are killed with it, not orphaned
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("two-process training did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]


@pytest.mark.slow
def test_two_process_supervised_gradcache_stays_in_sync(tiny_model_dir, tmp_path):
    files = [_triplet_csv(tmp_path / "one.csv", 1), _triplet_csv(tmp_path / "two.csv", 5)]
    out = tmp_path / "out"
    _torchrun("ddp_worker.py", tiny_model_dir, *files, str(out))
    r0, r1 = ((out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0[0] == "DistributedDataParallel"
    assert r0[1] == r1[1]  # same initial adapter on both ranks
    assert r0[2] == r1[2] and r0[2] != r0[1]  # trained, and identically on both ranks


@pytest.mark.slow
def test_two_process_evaluation_scores_once_and_stops_together(tiny_model_dir, tmp_path):
    files = [_triplet_csv(tmp_path / "one.csv", 1), _triplet_csv(tmp_path / "two.csv", 5)]
    out = tmp_path / "out"
    _torchrun("ddp_eval_worker.py", tiny_model_dir, *files, str(out))
    assert sorted(p.name for p in out.glob("scored-by-*")) == ["scored-by-rank0"]
    r0, r1 = (json.loads((out / f"result{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["stopped_early_at"] == 6 and r0["global_step"] == 6 and r0["best"]["step"] == 2
    assert (out / "best" / "adapter_model.safetensors").exists()
