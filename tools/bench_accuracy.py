"""Test accuracy of the rules (bp, auglocal and the baselines): one recipe, only the rule differs, over seeds.

    python tools/bench_accuracy.py --set epochs=1 --seeds 0 1 2 [--json]
    python tools/bench_accuracy.py --recipe recipes/fashion_mnist_resnet32.yaml --rules bp auglocal dgl infopro predsim
    python tools/bench_accuracy.py --recipe recipes/fashion_mnist_auglocal.yaml --set conversion.blocks=10

Every (seed, rule) run is an ordinary ``auglocal-train`` run of ``--recipe`` with
``conversion.rule`` and ``seed`` overridden (same data, epochs, optimiser and schedule), written to
``OUT/<rule>-seed<k>/``. Seeds go round the rules (seed 0 of every rule first), so a partial study
already compares all three. ``OUT/results.json`` is rewritten atomically after each run; running
the same command again skips finished runs and resumes an interrupted one from its ``last.pt``.
The table gives the final head's test accuracy (of best.pt, the epoch chosen on the validation
split) as mean ± std (sample std over seeds), that epoch's validation accuracy, the last epoch's
train accuracy (equal to the held-out one: the rule still underfits), the gaps auglocal minus each
other rule, and the time per epoch, also relative to bp; ``OUT/accuracy.png`` plots it and
``OUT/curves.png`` the validation accuracy after every epoch and the train accuracy (dashed; mean
over seeds), to see whether bp has flattened and which rules still underfit. ``--jobs N`` trains N runs at once in child processes with ``--threads`` each (on a
small model two one-thread runs finish sooner than two two-thread runs one after the other); each
child's training log then goes to ``OUT/<rule>-seed<k>/train.log``. ``--status`` with the same
arguments trains nothing and prints where each run stands (epochs done, its last held-out and train
accuracy), for a study that outlives a session.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # --jobs children unpickle _run_in_child from this module

from auglocal_fx.atomic import atomic_savefig, atomic_write_text  # noqa: E402
from auglocal_fx.cli.common import run_cli  # noqa: E402
from auglocal_fx.errors import AugLocalError  # noqa: E402
from auglocal_fx.rules import RULES as REGISTERED  # noqa: E402

RULES = ("bp", "dgl", "auglocal")  # the default study; --rules takes any registered rule
PROG = "bench_accuracy"
COLORS = {"bp": "tab:gray", "dgl": "tab:orange", "auglocal": "tab:blue", "infopro": "tab:green", "predsim": "tab:red"}


def _log(*args, **kwargs) -> None:
    """Training logs go to stderr: stdout carries the table or the JSON."""
    print(*args, **{**kwargs, "file": sys.stderr})


def _run_one(recipe_path: str, overrides: list[str], rule: str, seed: int, out: Path, log=_log) -> dict:
    """Train one (rule, seed) run, resuming its last.pt when an earlier attempt was cut off."""
    from auglocal_fx.training import load_recipe, train  # heavy: only when a run trains

    run_dir = out / f"{rule}-seed{seed}"
    recipe = load_recipe(recipe_path, [*overrides, f"conversion.rule={rule}", f"seed={seed}",
                                       f"output={run_dir}"])
    last = run_dir / "last.pt"
    summary = train(recipe, resume=str(last) if last.is_file() else None, log=log)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    split = summary["selected_on"]  # "val": best.pt chosen on the validation split, tested once
    return {"rule": rule, "seed": seed, "blocks": summary["blocks"], "epochs": recipe.epochs,
            "test_acc": summary["test_acc"], "aux_test_acc": summary.get("aux_test_acc") or [],
            "selected_on": split, "best_epoch": summary["best_epoch"],
            "held_out": split, "held_out_acc_per_epoch": [h[f"{split}_acc"] for h in history],
            "train_acc_per_epoch": [h["train_acc"] for h in history],
            # median: a study that spans sessions has epochs slowed by whatever else ran beside it
            "epoch_time_s": statistics.median(h["epoch_time_s"] for h in history),
            "images_per_s": statistics.mean(h["images_per_s"] for h in history),
            "aux_params": summary["aux_params"], "backbone_params": summary["backbone_params"]}


def _exit_with_parent() -> None:
    """A --jobs child ends when the study's process does (killed, its session closed): an orphan
    would go on training into the folder of a study started again, two processes per run."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # checkpoints are written atomically: a cut one is never taken for a whole one

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_in_child(threads: int, recipe_path: str, overrides: list[str], rule: str, seed: int, out: Path) -> dict:
    """One run in a worker process: its own thread count, its log in its folder (not interleaved)."""
    torch.set_num_threads(threads)
    from auglocal_fx.training.run_folder import mark_run_folder

    log_path = out / f"{rule}-seed{seed}" / "train.log"
    mark_run_folder(log_path.parent)  # the log is written there before the run starts: the folder is a run's
    with open(log_path, "a") as f, contextlib.redirect_stderr(f):  # progress lines too
        return _run_one(recipe_path, overrides, rule, seed, out, log=lambda *a, **k: print(*a, **{**k, "file": f, "flush": True}))


def _selected(run: dict) -> float | None:
    """Held-out accuracy of the epoch whose checkpoint was tested (best.pt, chosen on validation)."""
    curve, best = run.get("held_out_acc_per_epoch") or [], run.get("best_epoch")
    return curve[best - 1] if best and 0 < best <= len(curve) else None


def summarise(runs: list[dict]) -> dict:
    """Per rule: mean and sample std of test accuracy over seeds, the selected epoch's held-out
    accuracy, the last epoch's train accuracy (train = test: still underfitted), the mean epoch time
    and its ratio to bp's."""
    table = {}
    for rule in dict.fromkeys(r["rule"] for r in runs):
        mine = [r for r in runs if r["rule"] == rule]
        accs = [r["test_acc"] for r in mine]
        table[rule] = {"seeds": len(accs), "mean": statistics.mean(accs),
                       "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accs": accs,
                       "epoch_time_s": statistics.mean(r["epoch_time_s"] for r in mine),
                       "best_epochs": [r.get("best_epoch") for r in mine]}
        selected = [v for v in map(_selected, mine) if v is not None]
        if selected:
            table[rule]["selected_held_out_acc"] = statistics.mean(selected)
        train = [r["train_acc_per_epoch"][-1] for r in mine if r.get("train_acc_per_epoch")]
        if train:
            table[rule]["train_acc_last"] = statistics.mean(train)
    if "bp" in table:
        for row in table.values():
            row["time_ratio_to_bp"] = row["epoch_time_s"] / table["bp"]["epoch_time_s"]
    gaps = {}
    if "auglocal" in table:
        for other in (r for r in table if r != "auglocal"):
            if other in table:  # points of accuracy, auglocal minus the other rule
                gaps[f"auglocal_minus_{other}"] = 100 * (table["auglocal"]["mean"] - table[other]["mean"])
    return {"rules": table, "gaps_points": gaps}


def plot(path: Path, summary: dict, title: str) -> None:
    """Bars of mean test accuracy with std error bars and one dot per seed."""
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(summary["rules"])
    rows = [summary["rules"][r] for r in rules]
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = range(len(rules))
    ax.bar(xs, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=6,
           color=[COLORS.get(r, "tab:purple") for r in rules], alpha=0.8)
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["accs"]), [100 * a for a in r["accs"]], color="black", s=12, zorder=3)
        ax.annotate(f"{100 * r['mean']:.2f}", (x, 100 * r["mean"]), textcoords="offset points",
                    xytext=(0, 8), ha="center")
    lo = min(min(r["accs"]) for r in rows) * 100
    ax.set_ylim(max(0.0, lo - 4), min(100.0, max(100 * max(r["accs"]) for r in rows) + 2))
    ax.set_xticks(list(xs), rules)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def plot_curves(path: Path, runs: list[dict], title: str) -> None:
    """Held-out accuracy (validation, else test) after every epoch, solid, and the epoch's train
    accuracy, dashed, mean over seeds, one colour per rule: where the two meet, the rule underfits."""
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in dict.fromkeys(r["rule"] for r in runs):
        color = COLORS.get(rule, "tab:purple")
        for key, style, label in (("held_out_acc_per_epoch", "-", rule), ("train_acc_per_epoch", "--", None)):
            curves = [r[key] for r in runs if r["rule"] == rule and r.get(key)]
            if curves:
                n = min(map(len, curves))
                ax.plot(range(1, n + 1), [100 * statistics.mean(c[e] for c in curves) for e in range(n)],
                        style, marker="o" if style == "-" else None, ms=3, label=label, color=color)
    ax.set_xlabel("epoch")
    split = "validation" if any(r.get("held_out") == "val" for r in runs) else "test"
    ax.set_ylabel(f"{split} accuracy (%, solid) and train (dashed)\nmean over seeds")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _table(res: dict) -> str:
    """The study as text: test accuracy of the checkpoint chosen on the held-out split, that split's
    accuracy, the last epoch's train accuracy, the chosen epochs and the time per epoch."""
    lines = [f"{res['recipe']} {' '.join('--set ' + o for o in res['overrides'])}".rstrip(),
             f"{'rule':9s} {'seeds':>5s}  {'test acc (mean ± std)':>21s}  {'per seed':24s} {'held-out':>8s} "
             f"{'train':>6s} {'best epoch':>10s} {'s/epoch':>8s} {'vs bp':>6s}"]
    for rule, r in res["summary"]["rules"].items():
        per_seed = " ".join(f"{100 * a:.2f}" for a in r["accs"])
        ratio = f"x{r['time_ratio_to_bp']:.2f}" if "time_ratio_to_bp" in r else "-"
        best = "/".join(str(b) for b in r.get("best_epochs", []) if b) or "-"
        lines.append(f"{rule:9s} {r['seeds']:5d}  {100 * r['mean']:13.2f} ± {100 * r['std']:5.2f}  "
                     f"{per_seed:24s} {_pct(r.get('selected_held_out_acc')):>8s} {_pct(r.get('train_acc_last')):>6s} "
                     f"{best:>10s} {r['epoch_time_s']:8.0f} {ratio:>6s}")
    for key, value in res["summary"]["gaps_points"].items():
        lines.append(f"{key.replace('_', ' ')}: {value:+.2f} points")
    return "\n".join(lines)


def status(out: Path, rules: list[str], seeds: list[int], epochs: int | None, finished) -> str:
    """Where a study stands, from each run's metrics.jsonl, without training: for a study that
    outlives a session (each run resumes from its last.pt when the same command runs again).
    ``finished``: the (rule, seed) pairs results.json already holds."""
    lines = [f"{'run':18s} {'epochs':>7s} {'held-out':>8s} {'train':>6s} {'s/epoch':>8s}  state"]
    for seed in seeds:
        for rule in rules:
            metrics = out / f"{rule}-seed{seed}" / "metrics.jsonl"
            history = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
            last = history[-1] if history else {}
            held = next((last[k] for k in ("val_acc", "test_acc") if k in last), None)
            state = ("finished" if (rule, seed) in finished else "started" if history or metrics.parent.is_dir()
                     else "queued")
            lines.append(f"{rule + '-seed' + str(seed):18s} {len(history):3d}/{epochs or '?':<3} {_pct(held):>8s} "
                         f"{_pct(last.get('train_acc')):>6s} {last.get('epoch_time_s', 0):8.0f}  {state}")
    return "\n".join(lines)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/fashion_mnist_auglocal.yaml")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(REGISTERED))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override shared by every run, e.g. --set epochs=1 (repeatable)")
    p.add_argument("--out", default="runs/bench_accuracy", help="folder for the runs, results.json and the plot")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in a child process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per child with --jobs > 1 (default: this process's threads / jobs)")
    p.add_argument("--status", action="store_true",
                   help="print where each run of the study in --out stands (epochs, accuracies) and train nothing")
    args = p.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        raise AugLocalError(f"--jobs {args.jobs} --threads {args.threads}: both must be at least 1")
    for o in args.overrides:
        if o.split("=", 1)[0] in ("conversion.rule", "seed", "output"):
            raise AugLocalError(f"--set {o}: the benchmark sets rule, seed and output itself; use --rules/--seeds/--out")
    out = Path(args.out)
    results_path = out / "results.json"
    key = {"recipe": args.recipe, "overrides": args.overrides}
    done: dict[tuple, dict] = {}
    if results_path.is_file():
        old = json.loads(results_path.read_text())
        if {k: old.get(k) for k in key} != key:
            raise AugLocalError(f"{results_path} holds a study of another recipe or overrides; pass a new --out")
        done = {(r["rule"], r["seed"]): r for r in old["runs"]}
    res = {**key, "machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "runs": list(done.values())}
    if args.status:
        from auglocal_fx.training import load_recipe  # the epochs the study asks for

        print(status(out, args.rules, args.seeds, load_recipe(args.recipe, args.overrides).epochs, done))
        return 0
    todo = [(rule, seed) for seed in args.seeds for rule in args.rules if (rule, seed) not in done]

    def record(run: dict) -> None:
        res["runs"].append(run)
        res["summary"] = summarise(res["runs"])
        atomic_write_text(results_path, json.dumps(res, indent=2) + "\n")

    if args.jobs == 1:
        for rule, seed in todo:
            print(f"== {rule} seed {seed}", file=sys.stderr, flush=True)
            record(_run_one(args.recipe, args.overrides, rule, seed, out))
    elif todo:
        threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
        res["threads"] = threads
        # spawn: a forked child would inherit this process's torch thread pool state
        with futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_exit_with_parent) as pool:
            pending = {pool.submit(_run_in_child, threads, args.recipe, args.overrides, rule, seed, out): (rule, seed)
                       for rule, seed in todo}
            print(f"== {len(todo)} runs, {args.jobs} at once with {threads} thread(s) each; logs in "
                  f"{out}/<rule>-seed<k>/train.log", file=sys.stderr, flush=True)
            for fut in futures.as_completed(pending):
                rule, seed = pending[fut]
                try:
                    run = fut.result()
                except BaseException:  # say so now: queued runs are dropped, the running one ends (its last.pt resumes)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                print(f"== {rule} seed {seed}: test accuracy {100 * run['test_acc']:.2f}%", file=sys.stderr, flush=True)
                record(run)
    wanted = [r for r in res["runs"] if r["rule"] in args.rules and r["seed"] in args.seeds]
    if not wanted:
        raise AugLocalError("no runs to report; give --rules and --seeds")
    res["summary"] = summarise(wanted)
    title = f"{Path(args.recipe).name} {' '.join(args.overrides)}, seeds {' '.join(map(str, args.seeds))}"
    plot(out / "accuracy.png", res["summary"], title)
    plot_curves(out / "curves.png", wanted, title)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(_table(res))
        print(f"wrote {results_path}, {out / 'accuracy.png'} and {out / 'curves.png'}")
    return 0


def main(argv=None) -> int:
    return run_cli(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
