"""What a command checks before it loads a model or writes anything, and how an error reaches the user.

- Destinations. A command writes a directory only where nothing is, into an empty directory, or over its own
  earlier output, recognised by a marker file it wrote that lists every entry it wrote; anything else there (a
  run directory, a file added later) makes it refuse, so it never deletes what it did not write. A file output
  (``--summary-json``, ``compare --out``) replaces only an empty file or JSON of the kind fastlora writes there.
- Writability. The folder an output goes to is probed (a file created and removed at once) before the model
  loads: a read-only or misplaced output fails in a second, not after minutes of loading and training.
- Errors. :func:`explain` turns what a user or the machine can cause (bad input, missing or unreadable
  files, a full disk, permissions) into one line ``fastlora: what, where, what to do``; the CLI exits 2 with it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from fastlora.train.methods import METHODS


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message names it and what to do."""


# -- writability --------------------------------------------------------------------------------


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, flag: str, *, inside: bool = False) -> None:
    """Raise :class:`OutputError` unless files can be created where ``path`` will be written: in ``path`` itself
    (``inside``: an output directory written into) or beside it (a file, or a directory renamed into place).

    The nearest existing folder is probed by creating and removing a file, which tests what the write will meet
    (permissions, a read-only mount, a path under a file) where ``os.access`` would not (it ignores mounts and,
    for root, permissions).
    """
    target = os.path.abspath(path)
    start = target if inside else os.path.dirname(target)
    folder = _nearest_existing(start)
    if not os.path.isdir(folder):
        raise OutputError(f"fastlora: {flag} {path}: {folder} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastlora-probe-", dir=folder)
    except OSError as e:
        why = e.strerror or str(e)
        raise OutputError(
            f"fastlora: {flag} {path}: cannot write in {folder} ({why}); choose a writable location or fix its "
            "permissions"
        ) from e
    os.close(fd)
    os.unlink(probe)


# -- directory outputs --------------------------------------------------------------------------


def _entries(directory: str) -> set[str]:
    """Every file, link and folder under ``directory``, as relative paths with '/'."""
    out = set()
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        for name in dirs + files:
            out.add(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return out


def _marked(directory: str, marker: str, command: str) -> set[str] | None:
    """The entries ``command`` recorded in ``directory/marker``, or None when it holds no such marker."""
    try:
        with open(os.path.join(directory, marker), encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("written_by") != f"fastlora {command}":
        return None
    entries = content.get("entries")
    return set(entries) if isinstance(entries, list) else None


def check_dir_destination(path: str, flag: str, marker: str, command: str, *, shallow: bool = False) -> None:
    """Raise :class:`OutputError` unless ``path`` is absent, an empty directory, or ``command``'s own earlier
    output holding nothing but what it wrote (the entries listed in its ``marker``; ``shallow``: the top-level
    names only, for a directory of run directories whose insides their own runs check)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        raise OutputError(f"fastlora: {flag} {path} exists and is not a directory; choose a new directory")
    if not os.path.exists(path):
        return
    present = set(os.listdir(path)) if shallow else _entries(path)
    if not present:
        return
    own = _marked(path, marker, command)
    if own is None:
        listing = ", ".join(sorted(os.listdir(path))[:6])
        raise OutputError(
            f"fastlora: {flag} {path} is not empty ({listing}) and was not written by fastlora {command}; choose a "
            f"new or empty directory (fastlora {command} never replaces what it did not write)"
        )
    extra = sorted(present - own - {marker})
    if extra:
        raise OutputError(
            f"fastlora: {flag} {path} was written by fastlora {command} but now also holds {', '.join(extra[:6])}; "
            "move those away or choose a new directory"
        )


def new_dir_beside(final: str) -> str:
    """A fresh temporary directory beside ``final`` (same file system, so it can be renamed onto it)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(final)) + ".tmp-", dir=parent)


def marked_entries(directory: str, marker: str, command: str) -> set[str]:
    """The entries ``command``'s marker in ``directory`` lists (empty when there is none)."""
    return _marked(directory, marker, command) or set()


def write_marker(directory: str, marker: str, command: str, entries: list[str] | None = None, **info: Any) -> None:
    """Record in ``directory/marker`` that ``command`` wrote ``entries`` (default: every entry now there)."""
    entries = sorted(set(_entries(directory) if entries is None else entries) - {marker})
    content = {"written_by": f"fastlora {command}", **info, "entries": entries}
    with open(os.path.join(directory, marker), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def publish_dir(tmp: str, final: str, flag: str, marker: str, command: str) -> None:
    """Put the finished directory ``tmp`` at ``final``. ``final`` is checked again first (it may have changed
    while the model loaded); an earlier output of ``command`` there is moved aside under a fresh name and
    removed only once ``tmp`` is in place, so a failure leaves the old one whole."""
    check_dir_destination(final, flag, marker, command)
    if not os.path.isdir(final):
        os.rename(tmp, final)
        return
    final_abs = os.path.abspath(final)
    # a fresh empty name: rename() replaces an empty directory, never a user's "X.old"
    old = tempfile.mkdtemp(prefix=os.path.basename(final_abs) + ".old-", dir=os.path.dirname(final_abs))
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- file outputs -------------------------------------------------------------------------------


def check_file_destination(path: str, flag: str, is_own: Callable[[Any], bool], what: str) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written and replacing it loses nothing: absent, empty,
    or JSON for which ``is_own`` is true (``what`` names that kind in the message)."""
    if os.path.isdir(path):
        raise OutputError(f"fastlora: {flag} {path} is a directory; pass a file path")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            with open(path, encoding="utf-8") as f:
                own = is_own(json.load(f))
        except (OSError, ValueError):
            own = False
        if not own:
            raise OutputError(
                f"fastlora: {flag} {path} exists and does not hold {what}; choose another path or remove it first "
                "(fastlora never replaces what it did not write)"
            )
    check_writable(path, flag)


# -- adapter manifests --------------------------------------------------------------------------

_MANIFEST_TYPES = {"method": str, "task": str, "labels": (list, type(None)), "base_model": str, "max_length": int}


def read_manifest(directory: str, flag: str = "--adapter", *, base_given: bool = False) -> dict[str, Any]:
    """The ``fastlora_run.json`` of an artefact directory, checked: a JSON object with a known method and task,
    the labels, the base model (optional when ``base_given``: ``--model`` names it) and the maximum length."""
    usage = "pass the adapter/ or best/ directory of a fastlora finetune run"
    if not os.path.isdir(directory):
        raise OutputError(f"fastlora: {flag} {directory}: no such directory; {usage}")
    path = os.path.join(directory, "fastlora_run.json")
    if not os.path.isfile(path):
        inside = [d for d in ("adapter", "best") if os.path.isfile(os.path.join(directory, d, "fastlora_run.json"))]
        hint = f" (it holds {' and '.join(d + '/' for d in inside)}: pass one of those)" if inside else ""
        raise OutputError(f"fastlora: {flag} {directory} has no fastlora_run.json{hint}; {usage}")
    damaged = f"the file is damaged or not fastlora's; {usage}, or rerun fastlora finetune"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, OSError) as e:
        raise OutputError(f"fastlora: {path} is not readable JSON ({e}); {damaged}") from e
    if not isinstance(manifest, dict):
        raise OutputError(f"fastlora: {path} holds a JSON {type(manifest).__name__}, not an object; {damaged}")
    for key, kind in _MANIFEST_TYPES.items():
        if key == "base_model" and base_given and manifest.get(key) is None:
            continue
        if key not in manifest:
            extra = " (or pass --model)" if key == "base_model" else ""
            raise OutputError(f"fastlora: {path} lacks {key!r}; {damaged}{extra}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise OutputError(f"fastlora: {path}: {key!r} is {manifest[key]!r}; {damaged}")
    if manifest["method"] not in METHODS:
        raise OutputError(f"fastlora: {path}: unknown method {manifest['method']!r}; {damaged}")
    if manifest["task"] not in ("classification", "causal"):
        raise OutputError(f"fastlora: {path}: unknown task {manifest['task']!r}; {damaged}")
    return manifest


# -- errors -------------------------------------------------------------------------------------

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# torch's zip writer (torch.save) reports a failed write, usually a full disk, as a RuntimeError without errno:
# "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0" or "... file write failed"
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _no_space(exc: BaseException) -> bool:
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        if "inline_container.cc" in text and any(s in text for s in _TORCH_WRITE_FAILED):
            return True
    return False


def _oserror(e: OSError, missing_hint: str) -> str:
    message = str(e)
    if message.startswith("fastlora"):
        return message + (f"; {missing_hint}" if isinstance(e, FileNotFoundError) and missing_hint else "")
    where = f": {e.filename}" if e.filename else ""
    why = e.strerror or message
    if isinstance(e, FileNotFoundError):
        return f"fastlora: no such file or directory{where}; {missing_hint or 'check the path'}"
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        return f"fastlora: cannot write or read{where} ({why}); choose a writable location or fix its permissions"
    return f"fastlora: {why}{where}"


def explain(exc: BaseException, *, where: str = "", missing_hint: str = "", retry: str = "rerun") -> str | None:
    """One line ``fastlora: what, where, what to do`` for an error a user or the machine can cause, or None for
    anything else (a bug: the caller lets its traceback through). ``where`` names the output being written (for a
    full disk), ``missing_hint`` what to pass instead of a missing file, ``retry`` how to carry on."""
    if _no_space(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        place = f" while writing {where}" if where else ""
        return f"fastlora: no space left on device{place} ({first[:160]}); free some space and {retry}"
    if isinstance(exc, OSError):
        return _oserror(exc, missing_hint)
    from fastlora.train.data import DataError
    from fastlora.train.runtime import TrainingError

    if isinstance(exc, (DataError, TrainingError, ValueError)):
        message = str(exc)
        return message if message.startswith("fastlora") else f"fastlora: {message}"
    return None
