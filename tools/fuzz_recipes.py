"""Fuzz auglocal-train's recipes: every outcome is a checked run or one error line, never a traceback.

Hypothesis draws recipes from a small valid one (your own model and data: ``tests/own_model_fixture.py``)
with keys dropped, misspelled, retyped, out of range, given twice, and own-model / dataset
references broken, and hands each to ``auglocal-train RECIPE --check``: the path the command takes
up to the run's first step (recipe, output folder, device, data, the model converted), writing
nothing. A recipe passes when the command exits 0, or exits 2 having printed exactly one line
``auglocal-train: error: ...``, and wrote nothing; anything else (a traceback, another exit status,
more lines, an output folder made) is a failure, printed with its recipe.

    python tools/fuzz_recipes.py --count 1000            # prints the tally; exit 1 on a failure
    python tools/fuzz_recipes.py --count 10000 --seed 3

``--seed`` makes the draw repeatable (hypothesis derandomised from it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # own_model_fixture: a model and a dataset of your own

import torch  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from auglocal_fx.cli.train import main as train_main  # noqa: E402

BASE = {"model": {"factory": "own_model_fixture:small_cnn", "kwargs": {"width": 4}},
        "data": {"dataset": "own_model_fixture:blobs", "num_workers": 0, "val_split": 8},
        "conversion": {"blocks": 3, "aux_depth": 1, "pyramid": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine", "warmup_epochs": 0},
        "epochs": 2, "batch_size": 16, "seed": 0, "device": "cpu"}

# values of every kind a YAML file can hold, and the ones that break ranges
ODD_VALUES = [None, 0, -1, 1, 2, 3, 10**9, 0.5, -0.5, 1e-12, math.inf, -math.inf, math.nan, True, False, "",
              "abc", "1", "0.1", [], [1], [1, 2, 3], {}, {"a": 1}, "cpu", "cuda", "auto", "sgd", "adamw",
              "cosine", "none", "layers", "memory", "light", "float32", "bfloat16", 7.0]
BROKEN_REFS = ["own_model_fixture:nope", "no_such_module:make", "own_model_fixture", ":", "", "a.b.c:",
               "own_model_fixture:NOT_CALLABLE", "own_model_fixture:not_a_module", "own_model_fixture:one_dataset",
               "own_model_fixture:unlabelled", "own_model_fixture:mislabelled", "own_model_fixture:two_score_cnn",
               "os:getcwd", "builtins:dict", "resnet18", "own_model_fixture:small_cnn", "own_model_fixture:blobs"]
EXTRA_KEYS = ["ema_decay", "label_smoothing", "clip_grad", "mixup", "cutmix", "bf16", "threads", "log_interval",
              "eval_batch_size", "tensorboard", "cuda_graphs", "offload", "overlap", "channels_last", "parallel",
              "model.name", "model.num_classes", "model.in_chans", "model.img_size", "model.pretrained",
              "model.checkpoint", "data.image_size", "data.augment", "data.train_limit", "data.test_limit",
              "data.root", "data.download", "conversion.rule", "conversion.balance", "conversion.tail",
              "conversion.aux_head", "conversion.aux_init", "conversion.recompute", "conversion.aux_dtype",
              "conversion.max_bundle", "conversion.layers", "conversion.adapters", "conversion.light_width",
              "optimizer.momentum", "optimizer.nesterov", "optimizer.weight_decay", "optimizer.betas",
              "optimizer.per_unit", "schedule.min_lr", "schedule.warmup_start_factor"]


def _paths(recipe: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in recipe.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, prefix + k + ".")
    return out


def _set(recipe: dict, path: str, value) -> None:
    node, *keys = recipe, *path.split(".")
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _drop(recipe: dict, path: str) -> None:
    node, *keys = recipe, *path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node.pop(keys[-1], None)


def _misspell(word: str, i: int, how: int) -> str:
    i %= max(len(word), 1)
    if how == 0:
        return word[:i] + word[i + 1:]  # a letter left out
    if how == 1:
        return word[:i] + "x" + word[i:]  # one too many
    return word[:i] + word[i + 1:i + 2] + word[i:i + 1] + word[i + 2:]  # two swapped


@st.composite
def recipes(draw) -> str:
    """A recipe's YAML text: the valid base with one to three mutations."""
    r = copy.deepcopy(BASE)
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "misspell", "retype", "extra", "ref", "duplicate", "none"]))
        paths = _paths(r)
        if kind == "drop" and paths:
            _drop(r, draw(st.sampled_from(paths)))
        elif kind == "misspell" and paths:
            path = draw(st.sampled_from(paths))
            node_path, _, key = path.rpartition(".")
            node = r
            for k in filter(None, node_path.split(".")):
                node = node[k]
            if key in node:
                node[_misspell(key, draw(st.integers(0, 20)), draw(st.integers(0, 2)))] = node.pop(key)
        elif kind == "retype" and paths:
            _set(r, draw(st.sampled_from(paths)), draw(st.sampled_from(ODD_VALUES)))
        elif kind == "extra":
            _set(r, draw(st.sampled_from(EXTRA_KEYS)), draw(st.sampled_from(ODD_VALUES)))
        elif kind == "ref":
            _set(r, draw(st.sampled_from(["model.factory", "data.dataset"])), draw(st.sampled_from(BROKEN_REFS)))
        elif kind == "duplicate":
            duplicate = draw(st.sampled_from(list(BASE)))
    text = yaml.safe_dump(r, sort_keys=False)
    if duplicate is not None:  # a key given twice (yaml.safe_dump cannot write one)
        text += yaml.safe_dump({duplicate: BASE[duplicate]}, sort_keys=False)
    return text


def check_one(text: str, folder: Path) -> tuple[str, str]:
    """``(outcome, detail)`` of ``auglocal-train RECIPE --check``: ``ok``, ``error`` (one line, exit
    2) or ``FAIL`` (anything else: its output)."""
    path = folder / "recipe.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(path), "--check", "--set", f"output={folder / 'run'}"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = train_main(argv)
    except SystemExit as exc:  # argparse: not reached with these arguments
        return "FAIL", f"SystemExit({exc.code}): {err.getvalue()}"
    except BaseException as exc:  # noqa: BLE001  what the fuzzer is for: anything that escapes
        import traceback

        return "FAIL", "".join(traceback.format_exception(exc))
    lines = err.getvalue().strip().splitlines()
    if (folder / "run").exists():  # --check writes nothing
        return "FAIL", f"exit {rc}, and it wrote {folder / 'run'}"
    if rc == 0 and not any("Traceback" in line for line in lines):
        return "ok", ""
    if rc == 2 and len(lines) == 1 and lines[0].startswith("auglocal-train: error: "):
        return "error", lines[0].removeprefix("auglocal-train: error: ")
    return "FAIL", f"exit {rc}: {err.getvalue()}"


def fuzz(count: int, seed_value: int = 0, log=print) -> Counter:
    """Run ``count`` drawn recipes; returns the tally (``ok``, ``error``, ``FAIL``) and prints failures."""
    tally: Counter = Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads would cost more than they give
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @seed(seed_value)
        @settings(max_examples=count, database=None, deadline=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), phases=["generate"])
        @given(recipes())
        def one(text: str) -> None:
            outcome, detail = check_one(text, folder)
            tally[outcome] += 1
            if outcome == "FAIL":
                log(f"FAIL for the recipe:\n{text}{detail}")

        try:
            one()
        finally:
            torch.set_num_threads(threads)
    return tally


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000, help="recipes to draw (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    args = p.parse_args(argv)
    tally = fuzz(args.count, args.seed)
    total = sum(tally.values())
    print(f"fuzz_recipes: {total} recipes: {tally['ok']} checked runs, {tally['error']} one-line errors, "
          f"{tally['FAIL']} failures")
    return 1 if tally["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
