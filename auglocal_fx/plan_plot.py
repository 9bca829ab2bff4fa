"""``auglocal-convert --plot plan.png``: a plan as a picture.

Per block, two panels: forward MFLOPs per sample (the block's, and its aux net's stacked on top),
and activation MiB per sample (what the block and its aux net save for backward). With pipeline
stages the background is shaded per stage, labelled with its share of the training FLOPs, so an
unbalanced split or one heavy aux net shows at a glance.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_savefig
from .plan import Plan
from .stages import StagePlan

__all__ = ["plot_plan"]


def plot_plan(plan: Plan, path: str | Path, stages: StagePlan | None = None) -> None:
    """Write the picture of ``plan`` (and its ``stages``) to ``path`` as PNG, atomically."""
    import matplotlib  # heavy: only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(plan.blocks)))
    block_f = [plan.block_sum(b, "flops") / 1e6 for b in plan.blocks]
    tops = [a.flops / 1e6 for a in plan.aux] + [plan.head.flops / 1e6]
    block_a = [plan.block_sum(b, "act_bytes") / 2**20 for b in plan.blocks]
    top_a = [a.act_bytes / 2**20 for a in plan.aux] + [plan.head.act_bytes / 2**20]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(xs) + 2), 6), sharex=True)
    top.bar(xs, block_f, color="tab:blue", label="block forward")
    top.bar(xs, tops, bottom=block_f, color="tab:orange", label="aux net forward (last: head)")
    top.set_ylabel("MFLOPs / sample")
    bottom.bar(xs, block_a, color="tab:blue", label="block")
    bottom.bar(xs, top_a, bottom=block_a, color="tab:orange", label="aux net (last: head)")
    bottom.set_ylabel("activation MiB / sample")
    bottom.set_xlabel("block")
    bottom.set_xticks(xs)
    if stages is not None:
        total = sum(stages.costs) or 1.0
        for s, (us, cost) in enumerate(zip(stages.units, stages.costs)):
            for ax in (top, bottom):
                ax.axvspan(us[0] - 0.5, us[-1] + 0.5, color="0.85" if s % 2 == 0 else "0.95", zorder=0)
            top.text((us[0] + us[-1]) / 2, 1.01, f"stage {s}: {100 * cost / total:.0f}%", ha="center",
                     va="bottom", fontsize=8, transform=top.get_xaxis_transform())
    c = plan.config
    title = f"{c.model}, {len(plan.blocks)} blocks, rule={c.rule}" + (f", {stages.stages} stages" if stages else "")
    fig.suptitle(title, fontsize=10)
    top.set_ylim(0, 1.3 * max(f + t for f, t in zip(block_f, tops)))  # room for the legend
    top.legend(fontsize=8, loc="upper right", ncol=2)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)
