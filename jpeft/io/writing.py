"""Writing a model or adapter folder without losing what was there: checked paths, whole files.

A folder's files are each written to a temporary name beside it and renamed into place
once complete, so an interrupted save leaves the earlier file whole, and a path that
cannot be a folder is one message naming it (not a raw ``FileExistsError``).

Example:
    >>> import tempfile, pathlib
    >>> folder = output_folder(pathlib.Path(tempfile.mkdtemp()) / "adapter", what="a PEFT adapter")
    >>> write_whole(folder / "config.json", lambda path: path.write_text("{}"))
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def output_folder(folder: str | os.PathLike, *, what: str) -> Path:
    """``folder`` as a ``Path``, created with its parents; a ``ValueError`` when it cannot be a folder.

    ``what``: the thing being saved, for the message (``"a PEFT adapter"``).
    """
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        place = "is" if blocking == folder else f"is inside {str(blocking)!r}, which is"
        raise ValueError(f"cannot save {what} to {str(folder)!r}: that path {place} a file, not a folder. "
                         "Give a folder path (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot save {what} to {str(folder)!r}: {err.strerror or err}") from None
    return folder


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_path)`` then rename the finished file to ``path`` (an existing ``path`` stays whole until then)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
