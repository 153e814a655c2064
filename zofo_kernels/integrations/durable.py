"""Crash-safe folder writes: a folder is written beside its destination and swapped in whole.

Every folder the package saves (a trained model, a periodic checkpoint, ``best/``, the Trainer's
``save_model``, the de-quantised model cache) goes through :func:`replace_folder`:

1. the content is written into a temporary sibling ``<name>.zofo-tmp-<pid>-<n>``;
2. every file and folder in it is flushed to disk (``fsync``), the completion record
   ``zofo_complete.json`` (the list of files with their sizes) is written last, also fsynced;
3. the old folder, if any, is renamed to ``<name>.zofo-old``, the new one to ``<name>``, the
   parent folder is fsynced and the old one removed.

A crash (a kill, a full disk, a power cut) at any instant leaves either the old or the new
folder complete: before step 3 the destination is untouched; between the two renames the old
folder sits at ``<name>.zofo-old``, and :func:`recover` (called by every reader before it looks
at a folder) renames it back. Temporary siblings are never read and are removed by
:func:`recover`. A folder without a completion record, or whose files disagree with it, is
reported by :func:`check_complete`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

COMPLETE = "zofo_complete.json"
TMP_TAG = ".zofo-tmp-"
OLD_TAG = ".zofo-old"
_counter = itertools.count()
# tests only: ZOFO_TEST_CRASH="<point>#<k>" kills the process (SIGKILL) the k-th time it passes
# <point>; "<point>#<k>=enospc" raises a disk-full OSError there instead, "=sigterm" /
# "=sigint" sends that signal; several, comma-separated (see crash_point)
CRASH_ENV = "ZOFO_TEST_CRASH"
crash_counts: Dict[str, int] = {}


def crash_point(name: str) -> None:
    """A named moment of a save or a training run where the kill tests strike: with
    ``ZOFO_TEST_CRASH`` unset (always, outside the tests) it does nothing. The real code path
    runs up to the moment; the process then dies by SIGKILL (or meets a full disk, or
    receives SIGTERM / SIGINT)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    crash_counts[name] = crash_counts.get(name, 0) + 1
    for item in spec.split(","):
        where, _, action = item.partition("=")
        point, _, nth = where.partition("#")
        if point != name or crash_counts[name] != int(nth or 1):
            continue
        if action == "enospc":
            raise OSError(28, "No space left on device (ZOFO_TEST_CRASH)")
        if action in ("sigterm", "sigint"):
            os.kill(os.getpid(), getattr(signal, action.upper()))
            continue
        os.kill(os.getpid(), signal.SIGKILL)


class IncompleteFolderError(RuntimeError):
    """A folder lacks its completion record, or its files disagree with it."""


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data files were synced
        pass
    finally:
        os.close(fd)


def _files_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync_tree(folder: Path, recorded: Optional[Callable[[str], bool]] = None
               ) -> Dict[str, Dict[str, object]]:
    """fsync every file and folder under ``folder``; each file's size and sha256 by its
    relative path (only the files ``recorded(relative path)`` selects, when given)."""
    files = {}
    for path in _files_under(folder):
        rel = path.relative_to(folder).as_posix()
        if rel == COMPLETE or TMP_TAG in rel or (recorded is not None and not recorded(rel)):
            continue
        _fsync_path(path)
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}, reverse=True):
        _fsync_path(sub)
    return files


def write_complete_record(folder: Path,
                          recorded: Optional[Callable[[str], bool]] = None) -> None:
    """Sync ``folder`` and write its completion record last (listing the files that
    ``recorded(relative path)`` selects; every file by default)."""
    files = _sync_tree(folder, recorded)
    record = folder / COMPLETE
    partial = folder / (COMPLETE + TMP_TAG)  # then renamed: a record is whole or absent
    with open(partial, "w") as fh:
        json.dump({"version": 1, "files": files}, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, record)
    _fsync_path(folder)


def recorded_files(folder: Path) -> Dict[str, Dict[str, object]]:
    """The files ``folder``'s completion record lists (relative path -> bytes, sha256)."""
    record = folder / COMPLETE
    try:
        files = json.loads(record.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        raise IncompleteFolderError(
            f"{folder} has no {COMPLETE}: it was not completely written (an interrupted save, "
            "or a folder not written by zofo_kernels)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompleteFolderError(f"{record} is unreadable: {exc}") from None
    return files


def check_complete(folder: Path, *, hashes: bool = True) -> None:
    """Raise :class:`IncompleteFolderError` unless ``folder`` holds a completion record and
    every file it lists, at its recorded size (and sha256, unless ``hashes=False``)."""
    for rel, meta in sorted(recorded_files(folder).items()):
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise IncompleteFolderError(f"{folder / COMPLETE} lists {rel!r}, outside the folder")
        if not path.is_file():
            raise IncompleteFolderError(f"{folder}: {rel} is listed in {COMPLETE} but missing")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise IncompleteFolderError(f"{folder}: {rel} has {size} bytes, {COMPLETE} says "
                                        f"{meta.get('bytes')}")
        if hashes and sha256_of(path) != meta.get("sha256"):
            raise IncompleteFolderError(f"{folder}: {rel} does not match its sha256 in "
                                        f"{COMPLETE} (the file is damaged)")


def recover(target: Path) -> None:
    """Finish what an interrupted :func:`replace_folder` left behind ``target``: the old
    folder goes back into place if the swap stopped between its two renames, and temporary
    siblings are removed."""
    target = Path(target)
    old = target.with_name(target.name + OLD_TAG)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old)  # the swap completed; only the clean-up was cut short
        else:
            os.rename(old, target)
    parent = target.parent
    if parent.is_dir():
        for tmp in parent.glob(target.name + TMP_TAG + "*"):
            shutil.rmtree(tmp, ignore_errors=True)


def is_temporary(name: str) -> bool:
    """A name :func:`replace_folder` uses while it works (never a folder's content)."""
    return TMP_TAG in name or name.endswith(OLD_TAG)


def link_tree(source: Path, dest: Path, skip: Sequence[str] = ()) -> None:
    """Put ``source``'s entries (but the top-level names in ``skip`` and temporary ones) into
    the folder ``dest`` as hard links (copies where the file system has none): carrying
    files over into a new version of a folder costs no copy and keeps the old one intact."""
    for entry in sorted(source.iterdir()):
        if entry.name in skip or is_temporary(entry.name):
            continue
        out = dest / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), out)
        elif entry.is_dir():
            out.mkdir()
            link_tree(entry, out)
        else:
            try:
                os.link(entry, out)
            except OSError:
                shutil.copy2(entry, out)


@contextlib.contextmanager
def replace_folder(target: Path, *, recorded: Optional[Callable[[str], bool]] = None
                   ) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends without an
    error, seal it (completion record: every file, or those ``recorded(relative path)``
    selects) and swap it in for ``target``. On an error the temporary folder is removed and
    ``target`` is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.with_name(f"{target.name}{TMP_TAG}{os.getpid()}-{next(_counter)}")
    tmp.mkdir()
    try:
        yield tmp
        crash_point("durable:written")
        write_complete_record(tmp, recorded)
        crash_point("durable:sealed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(target.name + OLD_TAG)
    if target.exists():
        os.rename(target, old)
        crash_point("durable:old-moved")
    os.rename(tmp, target)
    _fsync_path(target.parent)
    crash_point("durable:swapped")
    if old.exists():
        shutil.rmtree(old)
