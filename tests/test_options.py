"""The planning options: declared once (``PlanConfig``'s fields, ``options.py``) and read from there
by ``to_auglocal`` / ``build_plan``, ``auglocal-convert``'s flags and a recipe's ``conversion:``
section, each front end naming an option its own way."""

from __future__ import annotations

import dataclasses

import pytest

from auglocal_fx import AugLocalError
from auglocal_fx.cli.common import flag_names
from auglocal_fx.cli.convert import parser
from auglocal_fx.options import options_of, resolve, validate, word_options
from auglocal_fx.plan import PlanConfig
from auglocal_fx.training.config import RECIPE_KEYS, ConversionSection

OPTIONS = {f.name: f for f in options_of(PlanConfig)}


def test_measured_fields_are_not_options():
    assert {"input_dtype", "input_layout", "extra_inputs"}.isdisjoint(OPTIONS)
    assert {"blocks", "aux_depth", "pyramid", "rule", "aux_init", "recompute"} <= set(OPTIONS)


def test_every_option_is_a_flag_with_its_default_and_help_unless_it_says_otherwise():
    actions = {a.dest: a for a in parser()._actions}
    for name, f in OPTIONS.items():
        if f.metadata["cli"] is False:
            assert name not in actions or name == "model", name  # --model is the timm name
            continue
        a = actions[name]
        assert a.option_strings[0] == "--" + name.replace("_", "-")
        assert f.metadata["help"] in a.help
        if not a.required:
            assert a.default == f.default, name
        if f.metadata["choices"] is not None:
            assert a.choices == list(f.metadata["choices"]())


def test_every_option_a_recipe_may_set_is_a_conversion_key_with_its_default():
    keys = {f.name: f for f in dataclasses.fields(ConversionSection)}
    assert set(keys) == {n for n, f in OPTIONS.items() if f.metadata["recipe"]}
    for name, f in keys.items():
        assert f.default == (8 if name == "blocks" else OPTIONS[name].default), name
    assert set(RECIPE_KEYS) == set(keys)


def test_options_are_a_config_a_block_count_or_keywords():
    base = PlanConfig(blocks=4, aux_depth=3)
    assert resolve(PlanConfig, base, {}) == base  # a copy: the caller's object is never changed
    assert resolve(PlanConfig, base, {"pyramid": 0.0}) == dataclasses.replace(base, pyramid=0.0)
    assert resolve(PlanConfig, 6, {"model_name": "net"}) == PlanConfig(blocks=6, model="net")
    assert resolve(PlanConfig, None, {}) == PlanConfig()


@pytest.mark.parametrize("base, overrides, message", [
    (None, {"aux_dept": 2}, "unknown option aux_dept=: did you mean aux_depth=?"),
    (None, {"input_dtype": "int64"}, "unknown option input_dtype="),  # measured, not given
    ("16", {}, "options=str is not a PlanConfig or a number of blocks"),
    (4, {"aux_depth": -1}, "aux_depth=-1 is not an integer >= 0"),
    (4, {"aux_depth": 1.5}, "aux_depth=1.5 is not an integer >= 0"),
    (4, {"pyramid": 1.5}, "pyramid=1.5 is outside [0, 1]"),
    (4, {"rule": "hebbian"}, "rule='hebbian' is not a rule; choose one of auglocal, bp, dgl, infopro, predsim"),
    (4, {"layers": "blocks.*"}, "layers='blocks.*' is not a list of module-path patterns"),
    (4, {"batch": 0}, "batch=0 is not a batch size: give an integer >= 1"),
    (0, {}, "blocks=0 is not a number of blocks"),
    (True, {}, "options=bool is not a PlanConfig"),
])
def test_a_wrong_option_is_one_line_naming_it(base, overrides, message):
    with pytest.raises(AugLocalError) as info:
        resolve(PlanConfig, base, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_error_names_the_option_in_each_front_ends_words():
    with pytest.raises(AugLocalError) as info:
        validate(PlanConfig(blocks=4, aux_depth=-1))
    exc = info.value
    assert str(exc) == "aux_depth=-1 is not an integer >= 0"
    assert exc.worded(flag_names(parser())) == "--aux-depth -1 is not an integer >= 0"
    assert exc.worded(RECIPE_KEYS) == "recipe key conversion.aux_depth = -1 is not an integer >= 0"
    assert exc.worded({}) == str(exc)


def test_notes_name_options_as_the_caller_does_whole_words_only():
    names = {"max_bundle": "--max-bundle", "tail": "--tail"}
    text = "a cut may hand on at most max_bundle=1 tensors; detail=3, tail=exact"
    assert word_options(text, names) == "a cut may hand on at most --max-bundle 1 tensors; detail=3, --tail exact"
