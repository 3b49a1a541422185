import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_torchrun_two_processes_match_one_and_only_rank0_saves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "ddp_worker.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # DDP keeps the replicas identical
    assert (tmp_path / "run0" / "checkpoint" / "model.safetensors").is_file()
    assert not (tmp_path / "run1").exists()  # rank 1 wrote nothing

    sys.path.insert(0, str(HERE))
    from ddp_worker import run

    single = run(tmp_path / "single")
    for k in rank0:  # the same global batches: equal up to floating-point summation order
        assert torch.allclose(rank0[k], single[k], atol=1e-5, rtol=1e-4), k
