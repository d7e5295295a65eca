"""EXPORT DIR manifest.json: what the runtime may trust, checked before anything is loaded.

    {"format": "agevlm-export", "format_version": 1, "target": "cpu", "precision": "fp32",
     "scheme": {...}, "model": {AgeVLMConfig}, "graphs": {"vision": {...}, "decoder": {...}},
     "files": {"vision.onnx": "<sha256>", ...}, "source": {...}, "parity": {...}}

Every file the runtime reads is listed under "files" with its sha256; a missing or changed
file, or a manifest of another format version, is refused with one clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BadInput
from ..fsutil import require_dir, sha256_file

FORMAT = "agevlm-export"
FORMAT_VERSION = 1
REQUIRED_FILES = ("vision.onnx", "decoder.onnx", "tokenizer.json", "preprocessor.json")


def load_manifest(export_dir: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an EXPORT DIR, after checking its format and (``verify``) every hash."""
    d = require_dir(export_dir, "export directory", "make one with `agevlm export`")
    path = d / "manifest.json"
    if not path.is_file():
        raise BadInput(f"{d} is not an EXPORT DIR: manifest.json is missing (make one with "
                       "`agevlm export --model RUN --out DIR`)")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))   # as written, whatever the locale
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}); re-export the model") from None
    except OSError as e:
        raise BadInput(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise BadInput(f"{path} is not an agevlm export manifest; re-export the model")
    if man.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{path} has format version {man.get('format_version')!r}; this runtime "
                       f"reads version {FORMAT_VERSION}: re-export with this agevlm version")
    files = man.get("files")
    if not isinstance(files, dict) or any(f not in files for f in REQUIRED_FILES):
        raise BadInput(f"{path} does not list every file ({', '.join(REQUIRED_FILES)}); "
                       "re-export the model")
    if verify:
        for name, digest in sorted(files.items()):
            f = d / name
            if not f.is_file():
                raise BadInput(f"{d}: {name} is missing (listed in manifest.json); "
                               "copy the whole EXPORT DIR or re-export")
            if sha256_file(f) != digest:
                raise BadInput(f"{d}: {name} does not match its sha256 in manifest.json (changed "
                               "or corrupted); copy the whole EXPORT DIR again or re-export")
    return man


def export_bytes(export_dir: str | os.PathLike, man: dict | None = None) -> int:
    """Bytes of what the runtime loads: the manifest's files, without the .ort copies (a
    mobile-gpu export ships both forms). The one size used by quantize, search and report."""
    d = Path(export_dir)
    man = man if man is not None else load_manifest(d, verify=False)
    return sum((d / f).stat().st_size for f in man["files"] if not f.endswith(".ort"))
