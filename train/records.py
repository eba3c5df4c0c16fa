"""Result records: one JSON file per measurement, the source of every published figure.

A benchmark (``python benchmarks/<name>.py``) and a training job (``python -m train``) each
end by writing a record: the figures, the command that produced them, the commit, a
description of the machine and the date. Records accumulate under ``results/<name>/``
(history stays in the files); the docs' results tables and plots are generated from the
newest record of each name by ``python scripts/results.py``.

The folder is ``results/`` under the working directory, or ``$JPEFT_RESULTS_DIR``.

Example:
    >>> import json, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> path = write_record("demo", {"ratio": 0.69}, command="python demo.py", folder=folder)
    >>> record = json.load(open(path))
    >>> record["name"], record["figures"], sorted(record)
    ('demo', {'ratio': 0.69}, ['command', 'commit', 'date', 'figures', 'machine', 'name'])
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Any

RESULTS_ENV = "JPEFT_RESULTS_DIR"


def results_dir() -> str:
    """Where records go: ``$JPEFT_RESULTS_DIR``, else ``results/`` under the working directory."""
    return os.environ.get(RESULTS_ENV) or "results"


def current_command() -> str:
    """The command line that started this process, as a user would type it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and not spec.name.endswith("__main__.py"):
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        head = ["python", os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "-"]
    return shlex.join(head + sys.argv[1:])


def current_commit() -> str:
    """The short commit hash of the working tree (``+dirty`` with uncommitted changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


_COMMIT_AT_IMPORT: str | None = None


def _commit_of_this_run() -> str:
    """The commit when this module was first imported (a benchmark imports it at start), not at the end."""
    global _COMMIT_AT_IMPORT
    if _COMMIT_AT_IMPORT is None:
        _COMMIT_AT_IMPORT = current_commit()
    return _COMMIT_AT_IMPORT


def describe_machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, core count, OS, Python, JAX and its devices, and the load."""
    machine = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    jax = sys.modules.get("jax")  # described only when the measurement used it
    if jax is not None:
        devices = jax.devices()
        machine["jax"] = jax.__version__
        machine["devices"] = f"{len(devices)} x {devices[0].device_kind}" if devices else "none"
    if hasattr(os, "getloadavg"):  # how busy the machine was over the last 5 minutes: timings depend on it
        machine["load_average_5min"] = round(os.getloadavg()[1], 2)
    machine["description"] = (f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['os']}"
                              + (f", JAX {machine['jax']} on {machine['devices']}" if jax is not None else "")
                              + (f", load average {machine['load_average_5min']:.1f} over the last 5 minutes"
                                 if "load_average_5min" in machine else ""))
    return machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_record(name: str, figures: dict[str, Any], *, command: str | None = None,
                 folder: str | None = None, **extra: Any) -> str:
    """Write one record ``<folder>/<name>/<date>-<commit>.json`` and return its path.

    Args:
        name: what was measured (a benchmark's name, ``train/<run name>``); ``/`` makes subfolders.
        figures: the measured values, JSON-serialisable.
        command: the command that produced them (default: this process's command line).
        folder: the results folder (default: :func:`results_dir`).
        **extra: more top-level fields (e.g. ``source``).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*", name) or {".", ".."} & set(name.split("/")):
        raise ValueError(f"record name {name!r} must be letters, digits, '_', '.', '-' and '/'")
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "name": name,
        "figures": figures,
        "command": command if command is not None else current_command(),
        "commit": _commit_of_this_run(),
        "machine": describe_machine(),
        "date": now.isoformat(timespec="seconds"),
        **extra,
    }
    text = json.dumps(record, indent=2, default=_plain) + "\n"  # serialise before touching the disk
    target = os.path.join(folder or results_dir(), *name.split("/"))
    os.makedirs(target, exist_ok=True)
    stem = f"{now:%Y%m%dT%H%M%S%f}-{record['commit'].replace('+', '-')}"  # file names sort by time
    path = os.path.join(target, stem + ".json")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(target, f"{stem}-{n}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """numpy / jax scalars and arrays as plain numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_records(folder: str | None = None) -> list[dict[str, Any]]:
    """Every record under ``folder`` (default :func:`results_dir`), oldest first by date."""
    root = folder or results_dir()
    records = []
    for base, _, files in os.walk(root):
        for file in sorted(files):
            if file.endswith(".json"):
                with open(os.path.join(base, file), encoding="utf-8") as f:
                    records.append(json.load(f))
    return sorted(records, key=lambda r: (r.get("date", ""), r.get("name", "")))


def newest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record of each name."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:  # oldest first, so later ones replace earlier ones
        out[record["name"]] = record
    return out


_commit_of_this_run()  # read at start: the code that ran, even if the tree changes before the end
