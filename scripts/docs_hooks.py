"""mkdocs hook: pages generated while the docs are built.

``config-reference.md`` is rendered from the declarations that validate a run config
(:mod:`scripts.config_reference`), so the published reference cannot drift from the
validator. (The results pages are generated from the records by ``python scripts/results.py``
and committed, since they carry figures.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.structure.files import File

_HERE = Path(__file__).resolve().parent


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", _HERE / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files, config):
    """Adds the generated config reference page to the site's files."""
    files.append(File.generated(config, "config-reference.md", content=_config_reference().render()))
    return files
