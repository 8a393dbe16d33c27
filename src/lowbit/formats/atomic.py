"""Atomic writes: a reader (or a crash) never sees a half-written checkpoint or results file.

Everything is written into a temporary sibling first and renamed into place at the end. The sibling
lives in the same directory as the target so the final `os.replace` is a rename on one filesystem,
never a copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lowbit.errors import OutputExistsError

__all__ = ["atomic_dir", "atomic_file", "check_output_dir"]


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output before any (possibly long) work starts."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir`; on success it becomes `out_dir`.

    On an exception the temporary directory is removed and `out_dir` is left as it was (absent, or
    the old contents when overwriting).
    """
    out = check_output_dir(out_dir, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes it 0700; the output should get the permissions a plain mkdir would give
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        # os.rename (not replace) so a directory that appeared meanwhile is an error, not merged
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
    if not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    # Two renames instead of rmtree-then-rename: the old output survives until the new one is in place.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it replaces `path`.

    An existing `path` is replaced (results files are meant to be rewritten by re-runs); on an
    exception it is left as it was and the temporary file is removed.
    """
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the permissions a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
