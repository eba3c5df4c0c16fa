"""One measurement per process: a benchmark runs itself again as a worker and reads back its result line.

Each stack (jpeft, torch) is timed in a fresh process so neither inherits the other's threads,
caches or compiled programs; the worker prints one line ``<mark><json>`` that the driver reads.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def run_worker(script: str, argv: list[str], mark: str, what: str) -> dict:
    """Run ``python script *argv``; its last ``mark`` line's JSON, with ``median`` of its ``times`` added.

    Raises a ``RuntimeError`` with the worker's last error output when it fails or prints no result.
    """
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(mark)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {what} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(mark):])
    result["median"] = statistics.median(result["times"])
    return result
