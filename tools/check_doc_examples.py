"""Run every ```python example of README.md and docs/ (the docs' promise: every example runs).

The blocks of one Markdown file run in order, in one fresh interpreter (so a block may use what an
earlier block of its page defined), in a scratch folder holding links to the repository's ``tests/``
and ``recipes/`` (an example may write files, and may import the hand-written models of
``tests/handwritten.py`` with ``sys.path.insert(0, "tests")``). Offline, on the CPU.

A block that cannot run here says so on its first line, visibly, with the reason:

    # doc-check: skip (needs a GPU: float16 autocast with a CUDA GradScaler)

A block that is a module the page's other blocks import (your model and data, named in a recipe
as ``my_project:tiny_net``) says so on its first line and is written to that file in the scratch
folder instead of run (the folder is the script's, so ``import my_project`` finds it):

    # file: my_project.py

    python tools/check_doc_examples.py               # README.md and docs/**/*.md
    python tools/check_doc_examples.py docs/guide/python.md
    python tools/check_doc_examples.py --list        # the blocks, run or skipped, without running

Exit status 1 when a block fails (its file, line and the traceback are printed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"^#\s*doc-check:\s*skip\s*\((?P<reason>[^)]+)\)")
FILE = re.compile(r"^#\s*file:\s*(?P<name>[\w-]+\.py)\s*$")
TIMEOUT = 600  # seconds per file


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked
    file: str | None = None  # written to this file of the scratch folder, not run


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        indent = m["indent"]
        lines = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                 for line in m["body"].splitlines()]
        code = "\n".join(lines) + "\n"
        first = next((line for line in lines if line.strip()), "")
        skip, file = SKIP.match(first.strip()), FILE.match(first.strip())
        out.append(Block(path, text.count("\n", 0, m.start()) + 1, code, skip["reason"] if skip else None,
                         file["name"] if file else None))
    return out


def program(blocks: list[Block]) -> str:
    """One script running the file's blocks in order; each announces itself, so a failure names it."""
    parts = ["import sys, warnings\nwarnings.simplefilter('ignore')\n"]
    for b in blocks:
        if b.skip or b.file:
            continue
        rel = b.path.relative_to(ROOT)
        parts.append(f"print('--- {rel}:{b.line}', file=sys.stderr, flush=True)\n")
        parts.append(f"exec(compile({b.code!r}, '{rel}:{b.line}', 'exec'))\n")
    return "".join(parts)


def run_file(path: Path, blocks: list[Block]) -> tuple[bool, str, float]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="doc_examples_") as tmp:
        work = Path(tmp)
        for name in ("tests", "recipes"):
            (work / name).symlink_to(ROOT / name)
        for b in blocks:
            if b.file:
                (work / b.file).write_text(b.code, encoding="utf-8")
        script = work / "_doc_examples.py"
        script.write_text(program(blocks), encoding="utf-8")
        env = dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)
            ok, log = proc.returncode == 0, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            ok, log = False, f"timed out after {TIMEOUT} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return ok, log, time.perf_counter() - start


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/**/*.md)")
    ap.add_argument("--list", action="store_true", help="list the blocks, run or skipped, and run nothing")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="files run at once")
    args = ap.parse_args(argv)
    files = [p.resolve() for p in args.files] or default_files()
    failed, ran, skipped, todo = [], 0, [], {}
    for path in files:
        rel = path.relative_to(ROOT)
        for b in blocks_of(path):
            if b.skip:
                skipped.append(b)
                print(f"skip {rel}:{b.line}: {b.skip}")
            else:
                todo.setdefault(path, []).append(b)
                if args.list:
                    print(f"file {rel}:{b.line}: {b.file}" if b.file else f"run  {rel}:{b.line}")
    if args.list:
        return 0
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda item: run_file(*item), todo.items())
        for (path, blocks), (ok, log, seconds) in zip(todo.items(), results):
            rel = path.relative_to(ROOT)
            ran += len(blocks)
            print(f"{'ok  ' if ok else 'FAIL'} {rel}: {len(blocks)} block(s), {seconds:.1f} s", flush=True)
            if not ok:
                failed.append(rel)
                print(log.rstrip())
    print(f"check_doc_examples: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"check_doc_examples: {ran} block(s) run, {len(skipped)} skipped, {len(failed)} file(s) failing"
          + (f": {', '.join(map(str, failed))}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
