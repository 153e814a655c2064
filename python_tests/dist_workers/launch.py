"""Launch a worker script under ``torchrun`` on loopback, with a hard wall-clock limit.

``--standalone`` makes torchrun pick a free port itself, so parallel test runs never collide.
The whole process group is killed when the limit is reached, so a hung collective can never
hang the test suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def worker(name: str) -> str:
    return os.path.join(HERE, name)


def torchrun(script: str, args: List[str], nproc: int = 2, timeout: float = 120.0,
             max_restarts: int = 0, env: Optional[Dict[str, str]] = None
             ) -> subprocess.CompletedProcess:
    """Run ``script args`` on ``nproc`` CPU processes; returns the completed process (stdout
    and stderr merged into ``stdout``). Raises ``TimeoutError`` after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", f"--max_restarts={max_restarts}",
           "--monitor_interval=0.2", script, *args]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""})
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    if env:
        full_env.update(env)
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"torchrun {os.path.basename(script)} did not finish within "
                           f"{timeout:g} s; output:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)
