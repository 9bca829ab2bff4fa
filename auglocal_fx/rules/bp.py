"""Plain end-to-end backprop as a rule: no aux nets, so the whole model is one block trained by
its own head — the baseline, through the same code path as the local rules."""

from __future__ import annotations

from .rule import Rule, register_rule

register_rule(Rule("bp", "no aux nets: one block, plain backprop (the baseline)"))
