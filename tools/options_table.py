"""Print the planning options as a Markdown table, from ``PlanConfig``'s fields: the docs' options
reference includes this output (``tools/doc_samples.py`` writes it), so it cannot go stale.

    python tools/options_table.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx.options import cli_name, options_of  # noqa: E402
from auglocal_fx.plan import PlanConfig  # noqa: E402
from auglocal_fx.training.config import ConversionSection  # noqa: E402


def rows() -> list[str]:
    recipe = {f.name: f.default for f in dataclasses.fields(ConversionSection)}
    out = ["| keyword | default | `auglocal-convert` | recipe key | what |", "|---|---|---|---|---|"]
    for f in options_of(PlanConfig):
        meta = f.metadata
        keyword = meta["keyword"] or f.name
        default = "required" if meta["cli"] and isinstance(meta["cli"], dict) and meta["cli"].get("required") \
            else f"`{f.default!r}`"
        flag = f"`{cli_name(f.name)}`" if meta["cli"] is not False else ""
        key = f"`conversion.{f.name}`" + (f" (default `{recipe[f.name]!r}`)" if recipe[f.name] != f.default else "") \
            if f.name in recipe else ""
        what = meta["help"] + (f"; one of {', '.join(f'`{c}`' for c in meta['choices']())}" if meta["choices"] else "")
        out.append(f"| `{keyword}` | {default} | {flag} | {key} | {what} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
