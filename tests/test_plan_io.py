"""The Plan as data: YAML / JSON round trips, error handling of bad files, the rich table."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from rich.console import Console

from auglocal_fx import AugLocalError, Plan, build_plan

PLANS = [
    ("resnet50", 16, {}),
    ("resnet50", 5, {"balance": "flops", "aux_depth": 3, "pyramid": 0.0}),
    ("resnet50", 16, {"tail": "reference"}),
    ("vit_tiny_patch16_224", 12, {}),
    ("cifar_resnet8", 1, {}),
]


@pytest.fixture(params=PLANS, ids=lambda p: f"{p[0]}-k{p[1]}-{'-'.join(map(str, p[2].values()))}")
def plan(request, zoo) -> Plan:
    name, k, kw = request.param
    case = zoo(name)
    return build_plan(case.model, k, analysis=case.analysis, model_name=name, **kw)


def test_yaml_round_trip(plan):
    text = plan.to_yaml()
    back = Plan.from_yaml(text)
    assert back == plan
    assert back.to_yaml() == text


def test_json_round_trip(plan):
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


def test_dict_round_trip_is_a_copy(plan):
    d = plan.to_dict()
    back = Plan.from_dict(d)
    assert back == plan
    d["layers"][0]["name"] = "changed"
    assert plan.layers[0].name != "changed"


def test_json_layout(plan):
    data = json.loads(plan.to_json())
    assert [x["name"] for x in data["layers"]] == [layer.name for layer in plan.layers]
    assert all(isinstance(x["name"], str) and x["name"] for x in data["layers"])
    assert [x["layers"] for x in data["blocks"]] == [b.layers for b in plan.blocks]
    assert len(data["aux"]) == len(plan.blocks) - 1
    for a, ref in zip(data["aux"], plan.aux):
        assert {"block", "selected_layers", "depth"} <= set(a)
        assert (a["block"], a["selected_layers"], a["depth"]) == (ref.block, ref.selected_layers, ref.depth)
    assert data["config"]["model"] == plan.config.model
    assert data["head"]["boundary"] == "output"


@pytest.mark.parametrize("text", [
    "{{{ not: yaml",
    "key: [unclosed",
    "- 1\n- 2\n",
    "just a string",
    "42",
    "",
    "config: 1\n",
    "config: {model: m, blocks: 2}\nlayers: 5\nhead: {}\nblocks: []\naux: []\n",
    "layers: []\n",
])
def test_from_yaml_rejects_garbage(text):
    with pytest.raises(AugLocalError) as exc:
        Plan.from_yaml(text)
    assert "\n" not in str(exc.value)


def test_from_yaml_rejects_plan_with_unknown_field(plan):
    d = plan.to_dict()
    d["layers"][0]["colour"] = "blue"
    with pytest.raises(AugLocalError):
        Plan.from_yaml(yaml.safe_dump(d))


def _render(renderable, width=250) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None).print(renderable)
    return buf.getvalue()


def test_table_renders(plan):
    text = _render(plan.table())
    assert f"{len(plan.layers)} layers -> {len(plan.blocks)} blocks" in text
    assert plan.config.model in text
    assert "head" in text
    # one row per block (+ the head row): the block indices appear in the first column
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) >= len(plan.blocks) + 1
    assert plan.layers[-1].name in text
    if plan.aux:
        assert "the backbone's FLOPs" in text


def test_table_renders_narrow(plan):
    text = _render(plan.table(), width=60)
    assert plan.config.model in text and "head" in text
    assert max(map(len, text.splitlines())) <= 60  # rich wraps the columns to the console's width


def test_a_plan_prints_as_text(plan, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    print(plan.table())
    print(plan)
    out = capsys.readouterr().out
    assert "<rich" not in out and "Table object" not in out
    assert out.count(f"{len(plan.layers)} layers -> {len(plan.blocks)} blocks") == 2
    assert max(map(len, out.splitlines())) <= 120


def test_convert_table_fits_the_terminal_and_wide_shows_every_column(capsys, monkeypatch):
    from auglocal_fx.cli.convert import main

    args = ["--model", "resnet18", "--blocks", "4", "--input-size", "3", "32", "32"]
    for columns in ("80", "120"):
        monkeypatch.setenv("COLUMNS", columns)
        assert main(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(map(len, lines)) <= int(columns), columns
        assert not any("adapters" in line for line in lines)  # a wide-only column
    monkeypatch.setenv("COLUMNS", "250")
    assert main([*args, "--wide"]) == 0
    header = " ".join(capsys.readouterr().out.splitlines()[:8])
    assert all(col in header for col in ("tensors", "act MiB", "aux depth", "adapters", "w+g+opt MiB"))
    assert main([*args, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["aux"]  # JSON is the plan, whatever the terminal
