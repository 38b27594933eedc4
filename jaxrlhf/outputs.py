"""Writing what a user keeps without ever losing what was there: every folder or file jaxrlhf
writes whole (exports, evaluations, preference pairs) is built beside its target and swapped
in at the end, and replaces only an earlier output of the same kind, never a user's files
(unless forced with `overwrite`) and never the folders a run reads from.

An output folder carries a small marker file, `MARK`, naming its kind; that is how a later
write knows the folder is its own to replace.
"""

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from jaxrlhf.errors import OutputError

MARK = ".jaxrlhf-output.json"
# What a user can do about a target of these kinds that holds their files: their scripts have
# no --overwrite (the others' do).
NOT_FORCED = {"frontier": "move it aside, or choose another output_dir (the frontier replaces only its own report)"}


def json_text(value) -> str:
    """`value` as indented JSON, every NaN or infinite float as null: JSON has no NaN (Python
    writes a bare `NaN` that other readers refuse), and a NaN here means unknown."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False) + "\n"


def write_failed(path, error: OSError, last_good: str = "") -> OutputError:
    """One line for a failed write (disk full, read-only, permissions): path, cause, and where
    the last good state is."""
    where = getattr(error, "filename", None) or path
    return OutputError(f"cannot write {where}: {error.strerror or error}" + (f"; {last_good}" if last_good else ""))


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_apart(target, inputs: Iterable, what: str) -> None:
    """`target` must not be, hold, or lie inside any existing local path in `inputs` (the
    checkpoints, tokenizers and data a run reads): writing it would replace them."""
    target = Path(target).expanduser().resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub name, or a path whose absence is reported by its loader
        source = Path(source).expanduser().resolve()
        if _contains(target, source) or _contains(source, target):
            raise OutputError(f"{what} {target} overlaps {source}, which this run reads from; "
                              "choose a folder apart from it")


def _own(target: Path, kind: str) -> bool:
    """An earlier output of `kind`, holding only the files it was written with (a file added
    since, such as a user's notes, makes it no longer ours to replace)."""
    try:
        mark = json.loads((target / MARK).read_text())
        return mark.get("kind") == kind and set(_files(target)) - {MARK} <= set(mark.get("files", ()))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def check_replaceable(target, kind: str, overwrite: bool = False) -> None:
    """`target` may be written: it does not exist, is an empty folder, or holds an earlier
    output of this `kind`; anything else only with `overwrite`."""
    target = Path(target).expanduser()
    if overwrite or not target.exists():
        return
    if target.is_dir() and (not any(target.iterdir()) or _own(target, kind)):
        return
    held = "a file" if not target.is_dir() else f"files jaxrlhf did not write ({listing(target)})"
    remedy = NOT_FORCED.get(kind, "choose another path, or pass --overwrite to replace it")
    raise OutputError(f"{target} already exists and holds {held}; {remedy}")


def listing(folder: Path, most: int = 3) -> str:
    """The first names in `folder`, for an error message."""
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def replace_folder(target, kind: str, build: Callable[[Path], None], overwrite: bool = False,
                   **record) -> Path:
    """Build a folder with `build(staging)` beside `target`, mark it as a `kind` output (with
    `record`), and swap it in whole: an interrupted write leaves the old folder as it was."""
    target = Path(target).expanduser().resolve()
    check_replaceable(target, kind, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise write_failed(target, e) from None
    try:
        build(staging)
        (staging / MARK).write_text(json.dumps({"kind": kind, **record, "files": _files(staging)}, indent=2) + "\n")
        _swap_in(staging, target)
    except OSError as e:
        raise write_failed(target, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    _remove(old)  # a stale copy, from a swap interrupted before its clean-up
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_file(path, text: str, overwrite: bool = False) -> Path:
    """Write `text` to `path` whole (a temporary file beside it, then a rename); an existing
    file is replaced only with `overwrite`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{path} is a folder; expected a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another path, or pass --overwrite to replace it")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from None
    return path
