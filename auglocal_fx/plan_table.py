"""The plan as a table: one row per block with its aux recipe (``Plan.table``, ``print(plan)``,
``auglocal-convert``'s output). Display only: ``plan.py`` holds the data it shows."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # annotations only: Plan.table imports this module
    from .plan import AuxRecipe, Plan

__all__ = ["PlanTable", "plan_table", "WIDE_ONLY", "NARROW"]


def plan_table(plan: Plan, memory: dict | None = None, wide: bool = False) -> PlanTable:
    """A ``rich`` table, one row per block with its aux recipe, that prints as text too
    (``print(plan.table())``); with ``memory`` (``costs.memory_summary``) also each unit's
    activations and the step's estimated peak. Compact columns unless ``wide`` (all of them:
    how many tensors a cut hands on, the block's activations, aux depth and adapters, each
    unit's weights, gradients and optimizer state)."""
    c = plan.config
    title = (f"{c.model}: {plan.num_layers} layers -> {len(plan.blocks)} blocks "
             f"(input {'x'.join(map(str, c.input_size))}, balance={c.balance}, "
             f"rule={c.rule}, aux_depth={c.aux_depth}, pyramid={c.pyramid}, tail={c.tail}, "
             f"aux_head={c.aux_head}; "
             "FLOPs and activation memory per sample)")
    backbone = sum(x.flops for x in plan.layers) + plan.head.flops
    if plan.aux and backbone:  # the rule's price in one figure: aux nets' FLOPs beside the backbone's
        title += (f"; aux nets: {sum(a.flops for a in plan.aux) / backbone:.3g}x the backbone's FLOPs, "
                  f"{_si(sum(a.params for a in plan.aux))} parameters")
    t = PlanTable(title=title, title_justify="left")
    columns = [("block", "right"), ("layers", "left"), ("out shape", "left"), ("tensors", "right"),
               ("params", "right"), ("MFLOPs", "right"), ("act MiB", "right"),
               ("aux depth", "right"), ("aux copies", "left"), ("adapters", "left"),
               ("aux params", "right"), ("aux MFLOPs", "right")]
    units = memory["units"] if memory else [None] * len(plan.blocks)
    if memory:
        columns += [("unit act MiB", "right"), ("w+g+opt MiB", "right")]
        t.caption, t.caption_justify = _memory_caption(memory), "left"
    narrow = Console().width < NARROW  # an 80-column terminal: the shapes make room for the layer names
    shown = [i for i, (col, _) in enumerate(columns)
             if wide or (col not in WIDE_ONLY and not (narrow and col == "out shape"))]
    for i in shown:  # figures keep their width; names and lists wrap; headers take two lines
        col, just = columns[i]
        head = col if wide else col.replace("aux ", "aux\n").replace("unit act ", "unit act\n")
        t.add_column(head, justify=just, no_wrap=just == "right" or col == "out shape")
    rows = []
    for b, unit in zip(plan.blocks, units):
        first, last = plan.layers[b.layers[0]], plan.layers[b.layers[-1]]
        span = f"{b.layers[0]}" if len(b.layers) == 1 else f"{b.layers[0]}-{b.layers[-1]}"
        names = first.name if first is last else f"{first.name} .. {last.name}"
        aux = plan.aux_for(b.index)
        extra = [] if unit is None else [
            f"{unit['act_per_sample'] / 2**20:,.2f}",
            f"{(unit['weights'] + unit['gradients'] + unit['optimizer']) / 2**20:,.0f}"]
        rows.append([
            str(b.index), f"{span} {names}", "x".join(map(str, last.out_shape)), str(last.tensors),
            _si(plan.block_sum(b, "params")), f"{plan.block_sum(b, 'flops') / 1e6:,.1f}",
            f"{plan.block_sum(b, 'act_bytes') / 2**20:,.2f}",
            str(aux.depth) if aux else "-",
            _copies(aux) if aux else "final head",
            ", ".join(aux.adapters) if aux and aux.adapters else "",
            _si(aux.params) if aux else "", f"{aux.flops / 1e6:,.1f}" if aux else "", *extra,
        ])
    h = plan.head
    head = ["head", h.name if h.name != "head" else "(pooling, classifier)",
            "x".join(map(str, h.out_shape)), "", _si(h.params), f"{h.flops / 1e6:,.1f}",
            f"{h.act_bytes / 2**20:,.2f}", "", "", "", "", "", *([""] * (2 * bool(memory)))]
    for row in rows:
        t.add_row(*(row[i] for i in shown))
    t.add_section()
    t.add_row(*(head[i] for i in shown))
    return t


# the plan table's columns shown only when asked for all (``Plan.table(wide=True)``, ``--wide``)
WIDE_ONLY = ("tensors", "act MiB", "aux depth", "adapters", "w+g+opt MiB")
NARROW = 100  # terminal columns below which the compact table leaves out the output shapes too


class PlanTable(Table):
    """A ``rich`` table that prints as text as well: ``str()`` renders it at the terminal's width
    (``COLUMNS`` where set), as ``rich`` would on a console."""

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=Console().width, color_system=None)
        with console.capture() as captured:
            console.print(self)
        return captured.get().rstrip("\n")


def _copies(aux: AuxRecipe) -> str:
    """The plan table's ``aux copies`` cell: the copied layers, and "light head" where the head is not copied."""
    copied = ", ".join(map(str, aux.selected_layers))
    if aux.light_head:
        return f"{copied} + light head" if copied else "light head only"
    return copied or "head only"


def _memory_caption(m: dict) -> str:
    """The estimated peak of a training step, in one sentence under the table."""
    t = m["total"]
    text = (f"Estimated peak of a training step at batch {m['batch']} ({m['assumes']}): "
            f"{_bytes(t['total'])} = weights {_bytes(t['weights'])} + optimizer {_bytes(t['optimizer'])} "
            f"+ gradients {_bytes(t['gradients'])} (one unit's) + activations {_bytes(t['activations'])} "
            f"(the largest unit's); bp {_bytes(m['bp_total'])} ({t['total'] / m['bp_total']:.2f}x)")
    ck = m.get("bp_checkpointed_total")  # plans written before it have none
    text += (f", bp with checkpointing at these {len(m['units'])} blocks {_bytes(ck)} "
             f"({t['total'] / ck:.2f}x)" if ck and len(m["units"]) > 1 else "")
    off = m.get("offload_total")  # plans written before it have none
    text += (f"; with the aux nets in host memory (offload: aux) {_bytes(off)} ({off / m['bp_total']:.2f}x bp's)."
             if off else ".")
    if len(m["units"]) > 1:
        c = m["crossover_batch"]
        text += (f" Below bp's from batch {c}." if c else " Never below bp's: the aux nets' activations per sample "
                 "are not smaller than the backbone's.")
    return text


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
