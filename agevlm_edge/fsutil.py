"""Atomic writers: every artifact appears whole or not at all.

Files are written to a temporary sibling and renamed into place. Directories (DATA, RUN,
EXPORT dirs) are built in a temporary sibling directory and swapped in by ``staged_dir``, so
an interrupted command never leaves a half-written artifact and never loses an old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import BadInput


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot write {path}: its folder cannot be made ({e.strerror}); "
                       "choose another path") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"cannot write {path}: it is a directory; give a file path")
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise BadInput(f"cannot write {path} ({e.strerror}); choose another path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints run to gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dumps_json(obj: Any) -> str:
    """Stable JSON (sorted keys) so that the same content gives the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, dumps_json(obj))


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    lines = (json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for r in rows)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def require_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    """``path`` as a Path when it is a directory; else one BadInput line that says whether it
    is missing or a file, and ``hint`` (how to make the right one)."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise BadInput(f"{what} {path} is a file, not a directory; {hint}")
    raise BadInput(f"{what} not found: {path}; {hint}")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError; an int past 4300 digits
        raise BadInput(f"{what} {path} is not valid JSON ({e}); fix or regenerate it") from None
    except RecursionError:
        raise BadInput(f"{what} {path} nests too deep to read; fix or regenerate it") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {path} is a directory; give the JSON file") from None
    except OSError as e:                             # permissions, say
        raise BadInput(f"cannot read {what} {path} ({e.strerror}); check its permissions") from None


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """A YAML (or JSON, its subset) file through yaml.safe_load; BadInput naming ``what`` for a
    missing, unreadable or malformed one. None for an empty file."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {path} is a directory; give the YAML file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{what} {path} is not a UTF-8 text file; give a .yaml file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadInput(f"{what} {path} is not valid YAML ({why}"
                       f"{f', line {mark.line + 1}' if mark else ''})") from None
    except (ValueError, TypeError) as e:   # a tag's constructor: 2020-13-45, !!int abc
        raise BadInput(f"{what} {path} holds a value YAML cannot read ({e}); quote it or fix "
                       "it") from None
    except RecursionError:
        raise BadInput(f"{what} {path} nests too deep to read; fix or regenerate it") from None


try:  # DATA DIR records are large (RLE masks): orjson parses them ~5x faster when installed
    from orjson import loads as _loads
except ImportError:  # the lean device install
    _loads = json.loads


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[dict]:
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(_loads(line))
                    except ValueError as e:  # json.JSONDecodeError and orjson's error both are
                        raise BadInput(f"{what} {path} line {n} is not valid JSON ({e})") from None
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    return rows


def check_out(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]] = (),
              overwrite: bool = False) -> None:
    """Refuse an output directory that is, or holds, one of ``inputs`` ((what, path) pairs:
    replacing it would delete them), a file in its place, or an existing non-empty one
    without ``overwrite``. Commands call it before any work; staged_dir calls it again."""
    out = Path(out)
    for what, d in inputs:
        if out.resolve() == Path(d).resolve() or out.resolve() in Path(d).resolve().parents:
            raise BadInput(f"--out {out} would replace the {what} {d}; choose another --out")
        if Path(d).resolve() in out.resolve().parents and out.is_dir() and any(out.iterdir()):
            raise BadInput(f"--out {out} is a directory inside the {what} {d}, and replacing it "
                           "would delete part of it; choose another --out")
    if out.exists() and not out.is_dir():
        raise BadInput(f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"output directory {out} already exists and is not empty; "
                       "pass --overwrite to replace it or choose another --out")


def check_out_file(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]] = ()
                   ) -> None:
    """Refuse an output file path that is a directory, lies under a file, is one of ``inputs``
    ((what, path) pairs) or would replace a file inside one of them (a new file beside them
    is fine). Commands call it before any work, so a bad path fails before a long run."""
    out = Path(out)
    if out.is_dir():
        raise BadInput(f"cannot write {out}: it is a directory; give a file path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInput(f"cannot write {out}: {parent} is a file; choose another path")
            try:   # a real probe: as root, os.access says yes to read-only places like /proc
                tempfile.NamedTemporaryFile(dir=parent).close()
            except OSError:
                raise BadInput(f"cannot write {out}: no file can be created in {parent}; "
                               "choose another path") from None
            break
    o = out.resolve()
    for what, d in inputs:
        d = Path(d).resolve()
        if o == d or (out.exists() and d in o.parents):
            raise BadInput(f"{out} would replace {'the' if o == d else 'a file of the'} {what} "
                           f"{d}; choose another path")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False,
               inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``out`` only if the block succeeds.

    Refuses to touch an existing non-empty ``out`` unless ``overwrite``, or one that holds or
    lies in one of ``inputs`` (check_out); even then the old directory is removed only after
    the new one is complete.
    """
    out = Path(out)
    check_out(out, inputs, overwrite=overwrite)
    _make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise BadInput(f"cannot write {out} ({e.strerror}); choose another --out") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the artifact should read like any other dir
    old = None
    try:
        yield tmp
        if out.exists():
            # a fresh name each time (rename onto an empty directory is allowed): a leftover
            # from a killed process never blocks the swap
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:    # a signal between the two renames puts the old directory back
        if old is not None:
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
