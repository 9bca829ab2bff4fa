"""Regenerate the sample outputs the documentation shows, by running their commands.

Each sample is one command of the project's (``auglocal-convert ...``) run in a scratch folder;
what it prints (stdout and stderr, or one of them) is written to ``docs/samples/<name>.txt`` after a
``$ command`` line, and the pages include those files (``pymdownx.snippets``) instead of pasting
output. The README cannot include files, so the block between ``<!-- doc-sample: NAME -->`` and
``<!-- /doc-sample -->`` in README.md is rewritten with the sample's text.

    python tools/doc_samples.py             # every sample
    python tools/doc_samples.py convert_resnet50 error_unknown_model   # some
    python tools/doc_samples.py --check     # write nothing; exit 1 if a sample or the README drifted

Run by ``make docs``; a sample that changed is named on stderr, to be committed with the code that
changed it. Figures that depend on the machine (the memory available, float32 error) come out as
this machine measures them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "docs" / "samples"
README = ROOT / "README.md"
COLUMNS = 200  # rich wraps its tables at the terminal width; 200 keeps the resnet50 plan table unwrapped


@dataclass(frozen=True)
class Sample:
    name: str
    command: str  # shell command, shown after "$ "
    stream: str = "both"  # both | stdout | stderr
    status: int = 0  # the exit status the command must end with (2: a user error)
    setup: str = ""  # run before, not shown, its output discarded (e.g. a checkpoint a command reads)
    tail: int = 0  # keep only the last N lines of the output (0: all)
    head: int = 0  # keep only the first N lines (0: all)
    # figures that change run to run (memory available, float error of random weights): a new run that
    # differs from the file in figures alone leaves the file as it is
    volatile: bool = False


SAMPLES_LIST = [
    # README quickstart and docs/guide/convert.md: the plan `make demo` prints
    Sample("convert_resnet50", "auglocal-convert --model resnet50 --blocks 16"),
    # docs/guide/memory.md: the estimate under that table
    Sample("memory_resnet50", "auglocal-convert --model resnet50 --blocks 16", tail=2),  # the same run
    Sample("memory_resnet50_balance_memory",
           "auglocal-convert --model resnet50 --blocks 16 --batch 32 --balance memory", tail=2),
    # docs/guide/convert.md: the note for a model that splits coarsely
    Sample("note_densenet121", "auglocal-convert --model densenet121 --blocks 4 --max-bundle 1 --input-size 3 64 64",
           stream="stderr"),
    # docs/guide/convert.md: layers found (L) against the repeated blocks of the module tree (U)
    Sample("granularity", "python tools/granularity.py poolformerv2_s12 maxvit_tiny_rw_224 gcvit_xxtiny cspresnet50 "
           "pit_s_224 densenet121", stream="stdout"),
    # docs/guide/parallel.md: the split into pipeline stages
    Sample("stages_resnet50", "auglocal-convert --model resnet50 --blocks 16 --stages 4", stream="stdout", tail=12),
    # docs/guide/convert.md and reference/errors.md: user errors
    Sample("error_unknown_model", "auglocal-convert --model resnet51 --blocks 4", status=2),
    Sample("error_blocks_range", "auglocal-convert --model resnet50 --blocks 40", status=2),
    Sample("error_input_size_memory", "auglocal-convert --model resnet18 --blocks 4 --input-size 3 100000 100000",
           status=2, volatile=True),
    Sample("error_recipe_key", "auglocal-train recipe.yaml", status=2,
           setup="sed -i 's/^  lr: 0.1$/  lrr: 0.1/' recipe.yaml"),
    # docs/guide/export.md: a verified export
    Sample("export_resnet50", "auglocal-export c.pt --out r50.onnx",
           setup="auglocal-convert --model resnet50 --blocks 16 --save c.pt", volatile=True),
    Sample("error_opset", "auglocal-export c.pt --out m.onnx --opset 26", status=2,
           setup="auglocal-convert --model resnet18 --blocks 3 --input-size 3 32 32 --save c.pt"),
    # docs/reference/options.md: every planning option, from PlanConfig's fields; every flag, as the
    # commands document it
    Sample("options_table", "python tools/options_table.py", stream="stdout"),
    Sample("help_convert", "auglocal-convert --help", stream="stdout"),
    Sample("help_train", "auglocal-train --help", stream="stdout"),
    Sample("help_export", "auglocal-export --help", stream="stdout"),
    Sample("help_eval", "auglocal-eval --help", stream="stdout"),
    # docs/guide/memory.md: the paper's CIFAR setting at its batch
    Sample("memory_resnet32", "auglocal-convert --model resnet32_cifar --input-size 3 32 32 --blocks 16 --tail reference "
           "--batch 1024", tail=2),
    # docs/guide/recipes.md: a recipe with every default filled in
    Sample("print_recipe", "auglocal-train recipes/fashion_mnist_auglocal.yaml --print-recipe", stream="stdout"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS=str(COLUMNS), PYTHONWARNINGS="ignore", NO_COLOR="1", TERM="dumb")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FORCE_COLOR", None)
    return env


# The commands are the project's console scripts. Starting Python and importing torch and timm costs
# seconds per command, so they are imported once here and every command runs in a child forked from
# this process: the same entry point its console script calls, with its own argv, folder and output
# files. Anything else (sed) runs in a shell.
os.environ.update(_env())
warnings.simplefilter("ignore")
SCRIPTS = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("auglocal-")}
MAINS = {name: ep.load() for name, ep in SCRIPTS.items()}


def _spawn(command: str, cwd: Path, out: Path, err: Path) -> int:
    """Start ``command`` in ``cwd`` with stdout/stderr to files; returns the child's pid."""
    argv = shlex.split(command)
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if argv[0] in MAINS:
            sys.argv = argv
            code = MAINS[argv[0]](argv[1:])
        else:
            code = subprocess.run(command, shell=True).returncode
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def _run_all(samples: list[Sample], jobs: int) -> dict[tuple[str, str], tuple[int, str, str]]:
    """Every sample's (setup, command) run once, at most ``jobs`` children at a time: its exit status,
    stdout and stderr."""
    todo = list(dict.fromkeys((s.setup, s.command) for s in samples))
    results: dict[tuple[str, str], tuple[int, str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="doc_samples_") as tmp:
        running: dict[int, tuple[tuple[str, str], Path, bool]] = {}  # pid -> (key, folder, is the setup)

        def start(key: tuple[str, str], work: Path, setup: bool) -> None:
            command = key[0] if setup else key[1]
            running[_spawn(command, work, work / "_out", work / "_err")] = (key, work, setup)

        queue = list(enumerate(todo))
        while queue or running:
            while queue and len(running) < jobs:
                i, key = queue.pop(0)
                work = Path(tmp) / str(i)
                work.mkdir()
                for name in ("recipes", "tools"):
                    (work / name).symlink_to(ROOT / name)
                shutil.copy(ROOT / "recipes" / "fashion_mnist_auglocal.yaml", work / "recipe.yaml")
                start(key, work, setup=bool(key[0]))
            pid, status = os.wait()
            key, work, setup = running.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            out, err = ((work / name).read_text(encoding="utf-8") for name in ("_out", "_err"))
            if setup and code != 0:
                raise SystemExit(f"doc_samples: setup `{key[0]}` exited {code}:\n{out}{err}")
            if setup:
                start(key, work, setup=False)
            else:
                results[key] = (code, out, err)
    return results


def text_of(sample: Sample, result: tuple[int, str, str]) -> str:
    """The sample's text: ``$ command``, then its output, trailing spaces removed."""
    code, stdout, stderr = result
    if code != sample.status:
        raise SystemExit(f"doc_samples: {sample.name}: `{sample.command}` exited {code}, "
                         f"expected {sample.status}:\n{stdout}{stderr}")
    out = {"both": stdout + stderr, "stdout": stdout, "stderr": stderr}[sample.stream]
    lines = [line.rstrip() for line in out.rstrip("\n").splitlines()]
    if sample.head:
        lines = lines[: sample.head]
    if sample.tail:
        lines = lines[-sample.tail:]
    return "\n".join([f"$ {sample.command}", *lines]) + "\n"


def _figures_masked(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", text)


README_BLOCK = re.compile(r"(<!-- doc-sample: (\w+) -->\n```text\n)(.*?)(```\n<!-- /doc-sample -->)", re.S)


def readme_with(samples: dict[str, str]) -> str:
    """README.md with every marked block replaced by its sample (a block naming no sample is kept)."""
    text = README.read_text(encoding="utf-8")
    return README_BLOCK.sub(lambda m: m[1] + samples.get(m[2], m[3]) + m[4], text)


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in SAMPLES_LIST]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"samples to run (default: all): {', '.join(names)}")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything would change")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="commands run at once")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        ap.error(f"unknown sample {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [s for s in SAMPLES_LIST if not args.names or s.name in args.names]
    SAMPLES.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    changed: list[str] = []
    # a command shown by several samples (the plan and its memory estimate) runs once
    start = time.perf_counter()
    runs = _run_all(chosen, args.jobs)
    for sample in chosen:
        texts[sample.name] = text = text_of(sample, runs[sample.setup, sample.command])
        path = SAMPLES / f"{sample.name}.txt"
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if sample.volatile and old is not None and _figures_masked(old) == _figures_masked(text):
            texts[sample.name] = text = old
        if old != text:
            changed.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(text, encoding="utf-8")
    print(f"doc_samples: {len(chosen)} samples from {len(runs)} commands in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    readme = readme_with(texts)
    if readme != README.read_text(encoding="utf-8"):
        changed.append("README.md")
        if not args.check:
            README.write_text(readme, encoding="utf-8")
    if changed:
        verb = "would change" if args.check else "changed (commit them)"
        print(f"doc_samples: {verb}: {', '.join(changed)}", file=sys.stderr)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
