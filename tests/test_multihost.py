"""Two local processes, one mesh: JAX's multi-process runtime on CPU (gloo collectives).

Each process has 2 CPU devices and feeds only its rows of every global batch; both
save and restore the adapter with orbax; the losses must equal a single-process run
of the same code (tests/multihost_worker.py), computed here.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

WORKER = pathlib.Path(__file__).parent / "multihost_worker.py"
NUM_PROCESSES, TIMEOUT_S = 2, 900  # a safety net for a hung run, far beyond a loaded machine's worst case


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_workers(workdir: pathlib.Path) -> list[list[float]]:
    """Starts the processes, waits at most TIMEOUT_S, and kills every one left on any failure."""
    # The worker imports the training program, which is not installed: it runs from the repository root.
    root = str(WORKER.parent.parent)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    port = free_loopback_port()
    logs = [open(workdir / f"worker_{i}.log", "w+") for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port), str(workdir)],
                              env=env, stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read()[-3000:])
        log.close()
    codes = [p.returncode for p in procs]
    assert codes == [0] * NUM_PROCESSES, f"worker exit codes {codes} (negative: killed after {TIMEOUT_S}s " \
        f"or after the other failed); output:\n" + "\n----\n".join(outputs)
    return [json.loads((workdir / f"losses_{i}.json").read_text()) for i in range(NUM_PROCESSES)]


def test_two_processes_match_one(tmp_path):
    per_process = run_workers(tmp_path)
    worker = load_worker()
    reference = worker.train({"data": 1, "fsdp": 1, "tensor": 1}, tmp_path / "reference", devices=jax.devices()[:1])
    assert len(reference) == worker.STEPS
    assert per_process[0] == per_process[1]  # one global computation, seen by both processes
    np.testing.assert_allclose(per_process[0], reference, rtol=1e-5)
    assert len(set(reference)) == worker.STEPS  # every step saw new data and a new adapter
