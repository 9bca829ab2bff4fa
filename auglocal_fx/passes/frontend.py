"""Which front end traces the model: ``torch.fx`` (symbolic trace, ``trace.py``) or ``torch.export``
(non-strict, ``export_trace.py``); ``auto`` tries fx and exports what fx cannot trace.

Both give the same kind of graph (leaf modules as ``call_module`` nodes on the model's own modules,
fx's ``nn_module_stack``), so every pass after the trace is the same. fx comes first under ``auto``:
its graphs are the ones every figure and test of this project was made with, and it needs no example
run; export traces what fx's proxies cannot (iterating a tensor, Hugging Face transformers).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..errors import AugLocalError, first_line
from .export_trace import export_trace
from .trace import _from_transformers, trace

__all__ = ["FRONTENDS", "trace_with"]

FRONTENDS = ("auto", "fx", "export")


def trace_with(model: nn.Module, frontend: str, examples: tuple[torch.Tensor, ...],
               output: str | int | None = None) -> tuple[fx.GraphModule, str]:
    """``(graph, the front end that traced it)`` of ``model`` taking ``examples`` (its inputs, batch
    first), in its current train/eval mode."""
    if frontend == "export":
        return export_trace(model, examples, output), "export"
    try:
        return trace(model, output, inputs=len(examples)), "fx"
    except AugLocalError as fx_error:
        if frontend == "fx":
            raise
        try:
            return export_trace(model, examples, output), "export"
        except AugLocalError as export_error:
            if str(export_error) == str(fx_error) or _from_transformers(type(model)):  # the call's own
                raise  # mistake (both say the same), or a model only export can read: its error is the one
            # fx's error names the module, source line and node at fault; export's says what it met there
            raise AugLocalError(f"{fx_error} (torch.export, tried next: {first_line(export_error, 200)})") from fx_error
