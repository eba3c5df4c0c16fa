"""The run folder: where a run writes, checked before anything is written.

A run folder holds ``run.json`` (the marker that it is a jpeft run), ``config.yaml``,
``metrics.jsonl``, ``checkpoints/``, the final ``adapter/``, predictions and plots.
:func:`plan` decides which folder a run uses and whether it continues an earlier run,
without writing anything, so that a refused command changes nothing:

* ``run_dir=<folder>``: a folder that does not exist or is empty starts a fresh run; a
  folder with ``run.json`` is an earlier run (resumed from its checkpoints when it has
  some); any other folder is refused (it is somebody's data, not a run);
* otherwise a new ``<out_dir>/<name>-<timestamp>`` folder.

A folder that cannot be created (a file in the way, no permission) is refused up front.

Example:
    >>> import tempfile
    >>> folder = plan(run_dir=tempfile.mkdtemp(), out_dir="runs", name="demo")
    >>> folder.existing
    False
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import NamedTuple

from train.errors import ConfigError

MARKER = "run.json"
FORMAT = "jpeft-run"


class RunFolder(NamedTuple):
    path: str
    existing: bool  # an earlier run's folder (it has the marker)


def _check_creatable(path: str, key: str) -> None:
    """``path`` can be made: its nearest existing ancestor is a writable folder."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key}={path!r} cannot be created: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path!r} cannot be created: {parent!r} is not writable; choose another folder")


def is_run(path: str) -> bool:
    """Whether ``path`` is a jpeft run folder (it has the marker)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def marker(path: str) -> dict:
    """The marker of an earlier run (``{}`` if unreadable)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def plan(*, run_dir: str | None, out_dir: str, name: str) -> RunFolder:
    """The folder a run uses, checked but not created (see the module docstring)."""
    if run_dir is not None:
        if os.path.exists(run_dir):
            if not os.path.isdir(run_dir):
                raise ConfigError(f"run_dir={run_dir!r} is a file, not a folder")
            if is_run(run_dir):
                if not os.access(run_dir, os.W_OK | os.X_OK):
                    raise ConfigError(f"run_dir={run_dir!r} is not writable")
                return RunFolder(run_dir, existing=True)
            contents = sorted(os.listdir(run_dir))
            if contents:
                shown = ", ".join(contents[:5]) + (" ..." if len(contents) > 5 else "")
                raise ConfigError(f"run_dir={run_dir!r} is not a jpeft run folder (no {MARKER}) and holds other "
                                  f"files ({shown}); nothing is written there. Give an empty or new folder")
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise ConfigError(f"run_dir={run_dir!r} is not writable")
            return RunFolder(run_dir, existing=False)
        _check_creatable(run_dir, "run_dir")
        return RunFolder(run_dir, existing=False)
    _check_creatable(out_dir, "out_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(out_dir, f"{name}-{stamp}"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(out_dir, f"{name}-{stamp}-{n}")
    return RunFolder(path, existing=False)


def create(folder: RunFolder, *, method: str, config_yaml: str, main: bool = True) -> None:
    """Make the folder and write its marker and ``config.yaml`` (process 0 of a multi-process run)."""
    os.makedirs(folder.path, exist_ok=True)
    if not main:
        return
    record = {"format": FORMAT, "method": method,
              "created": marker(folder.path).get("created") or datetime.datetime.now().isoformat(timespec="seconds")}
    with open(os.path.join(folder.path, MARKER), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(folder.path, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)
