"""Zoo-wide coverage: convert -> axis audit -> eval parity -> one training step -> ONNX parity, per timm family.

    python tools/zoo_check.py                      # the smallest model of every timm family
    python tools/zoo_check.py --filter 'vit_*'     # models (or families) matching a glob
    python tools/zoo_check.py --all --timeout 600  # every name in timm.list_models()
    python tools/zoo_check.py --source torchvision # every torchvision classification model
    python tools/zoo_check.py --source hf          # every transformers image / sequence classifier and
                                                   # causal LM, from tiny random configs (needs [hf])

Each model runs in its own process with a time limit, so a hang or crash costs one row, never the
run; the processes fork from a server that has imported torch and the model libraries once. Results
are written to --json after every model (atomically), and --resume skips models already there
(--rerun-failed: except those that failed). Prints a table with the stage each model reached and
its error, then the pass count of each stage and the failures per stage.

Granularity: per model, the layers found (L), the repeated blocks of its module tree (U, from
``auglocal_fx.passes.module_groups.repeated_blocks``: children of a container that share a composite class with
a sibling, counted through to the innermost such blocks) and the most tensors one layer boundary
hands on. A model reaches block granularity when L >= U.

Axis audit (``auglocal_fx.assemble.axis_audit``): every adapter and light head of the converted net, and the
dgl / infopro / predsim aux heads on the same layers, run with each input axis resized in turn; a
model passes only when every one contracts the measured channel axis alone ("axes" column: good /
audited).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx.atomic import atomic_write_text  # noqa: E402
from auglocal_fx.testing.zoo import SOURCES, STAGES, ZooResult, check_model, families, smallest  # noqa: E402


def _child(name: str, family: str, blocks: int, source: str, queue) -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    queue.put(check_model(name, family, blocks, source=source).to_dict())


def _context(source: str):
    """Children forked from one server that imported the check and its libraries: seconds a model, not
    the imports' ten (a fresh server, never the parent: no thread pool or state of ours is inherited)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["auglocal_fx.testing.zoo"] + (["transformers"] if source == "hf" else []))
    return ctx


def run_one(name: str, family: str, blocks: int, timeout: float, source: str = "timm") -> dict:
    ctx = _context(source)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, family, blocks, source, queue), daemon=True)
    start = time.perf_counter()
    proc.start()
    try:
        while True:  # poll, so a child killed for memory costs seconds, not the whole time limit
            try:
                return queue.get(timeout=2)
            except queue_module.Empty:
                if time.perf_counter() - start > timeout:
                    break
                if not proc.is_alive():  # a result sent just before exiting may still be in the pipe
                    try:
                        return queue.get(timeout=1)
                    except queue_module.Empty:
                        break
        proc.kill()
        proc.join(5)
        code = proc.exitcode
        why = f"time limit of {timeout:.0f}s" if code in (None, -9) and time.perf_counter() - start > timeout else \
            "killed (out of memory?)" if code == -9 else f"process died (exit code {code})"
        res = ZooResult(name, family, failed="timeout", error=why)
        res.seconds = round(time.perf_counter() - start, 1)
        return res.to_dict()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=SOURCES, default="timm",
                   help="timm (default: one model per family), torchvision (every classification model) or hf "
                        "(every transformers image / sequence classifier and causal LM, tiny configs)")
    p.add_argument("--all", action="store_true", help="every model name, not one per family")
    p.add_argument("--filter", metavar="GLOB", help="only models or families matching GLOB")
    p.add_argument("--blocks", type=int, default=16, help="K = min(BLOCKS, layers) (default 16)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per model (default 300)")
    p.add_argument("--json", default="zoo_check.json", help="results file (default zoo_check.json)")
    p.add_argument("--resume", action="store_true", help="skip models already in --json")
    p.add_argument("--rerun-failed", action="store_true", help="with --resume: run the failed models again")
    args = p.parse_args(argv)

    fams = families(args.filter, args.source)
    if not fams:
        print(f"no {args.source} model matches {args.filter!r}", file=sys.stderr)
        return 2
    if args.all or args.source != "timm":
        todo = [(n, f) for f, names in fams.items() for n in names]
    else:
        print(f"choosing the smallest model of {len(fams)} families ...", file=sys.stderr, flush=True)
        todo = [(smallest(names), f) for f, names in fams.items()]
    out = Path(args.json)
    done: dict[str, dict] = {}
    if args.resume and out.is_file():
        before = json.loads(out.read_text())
        if (before.get("source"), before.get("filter")) != (args.source, args.filter):
            # this run rewrites the file with its own models: the others' results would be lost
            print(f"{out} holds a run of --source {before.get('source')} --filter {before.get('filter')!r}; resume it "
                  f"with those, or give this run another --json", file=sys.stderr)
            return 2
        done = {r["model"]: r for r in before["results"]
                if not (args.rerun_failed and len(r["passed"]) < len(STAGES))}
    results = []
    for i, (name, family) in enumerate(todo, 1):
        if name in done:
            results.append(done[name])
            continue
        print(f"[{i}/{len(todo)}] {family}: {name} ...", file=sys.stderr, flush=True)
        r = run_one(name, family, args.blocks, args.timeout, args.source)
        results.append(r)
        mark = "PASS" if len(r["passed"]) == len(STAGES) else f"fails at {r['failed']}: {r['error']}"
        print(f"    {r['seconds']:.0f}s  {mark}", file=sys.stderr, flush=True)
        atomic_write_text(out, json.dumps(_payload(results, args), indent=1) + "\n")
    atomic_write_text(out, json.dumps(_payload(results, args), indent=1) + "\n")
    _print_table(results)
    return 0


def _payload(results: list[dict], args) -> dict:
    import timm
    import torch
    import torchvision

    versions = {"timm": timm.__version__, "torchvision": torchvision.__version__, "torch": torch.__version__}
    if args.source == "hf":
        import transformers
        versions["transformers"] = transformers.__version__
    return {"source": args.source, **versions, "blocks": args.blocks,
            "mode": "all" if args.all or args.source != "timm" else "smallest per family",
            "filter": args.filter,
            "totals": _totals(results), "results": results}


def _totals(results: list[dict]) -> dict:
    n = len(results)
    counts = {s: sum(s in r["passed"] for r in results) for s in STAGES}
    granular = sum(bool(r.get("granular")) for r in results)
    audited = [r for r in results if r.get("axes_checked") is not None]
    return {"models": n, **{f"{s}_passed": c for s, c in counts.items()},
            "axes_modules_checked": sum(r["axes_checked"] for r in audited),
            "axes_modules_wrong": sum(len(r.get("axes_wrong") or []) for r in audited),
            "axes_disagreements": sum(r.get("axes_disagree") or 0 for r in audited),
            "axes_unknown_tensors": sum(r.get("axes_unknown") or 0 for r in audited),
            "all_passed": counts[STAGES[-1]], "all_passed_pct": round(100 * counts[STAGES[-1]] / max(n, 1), 1),
            "block_granular": granular,
            "failed_at": {s: sum(r["failed"] == s for r in results)
                          for s in ("create", *STAGES, "timeout") if any(r["failed"] == s for r in results)}}


def _axes(r: dict) -> str:
    """The axis audit column: modules whose weights contract the channel axis alone / modules audited."""
    if r.get("axes_checked") is None:
        return ""
    return f"{r['axes_checked'] - len(r.get('axes_wrong') or [])}/{r['axes_checked']}"


def _print_table(results: list[dict]) -> None:
    print(f"{'family':24} {'model':38} {'size':>5} {'L':>3} {'U':>3} {'cut':>3} {'K':>2} {'axes':>7}  {'reached':8} error")
    for r in results:
        reached = r["passed"][-1] if r["passed"] else "-"
        size = r["input_size"][-1] if r["input_size"] else ""
        print(f"{r['family'][:24]:24} {r['model'][:38]:38} {size!s:>5} {r['layers'] or '':>3} "
              f"{r.get('repeated_blocks') or '':>3} {r.get('widest_cut') or '':>3} "
              f"{r['blocks'] or '':>2} {_axes(r):>7}  {reached:8} {r['error'] or ''}")
    t = _totals(results)
    print("\npassed per stage: " + ", ".join(f"{s} {t[f'{s}_passed']}/{t['models']}" for s in STAGES))
    print(f"all stages: {t['all_passed']}/{t['models']} ({t['all_passed_pct']}%)")
    print(f"axis audit: {t['axes_modules_checked'] - t['axes_modules_wrong']}/{t['axes_modules_checked']} adapters and "
          f"aux heads contract the channel axis alone; measured vs graph layout disagree on "
          f"{t['axes_disagreements']} tensors; {t['axes_unknown_tensors']} crossing tensors of unknown layout")
    print(f"block granularity (layers >= repeated blocks): {t['block_granular']}/{t['models']}")
    if t["failed_at"]:
        print("failed at: " + ", ".join(f"{s} {n}" for s, n in t["failed_at"].items()))


if __name__ == "__main__":
    sys.exit(main())
