"""The transformers zoo (tools/zoo_check.py --source hf): which architectures it runs, the tiny configs
it builds them from, and the zoo check's stages on a few of them."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from auglocal_fx.testing.hf_zoo import HEADS, LAYERS, VOCAB, architectures, create_case, tiny_config  # noqa: E402
from auglocal_fx.testing.zoo import STAGES, check_model, families  # noqa: E402


def test_every_architecture_of_the_three_tasks_is_listed_once_by_model_type():
    found = architectures()
    assert found["ViTForImageClassification"] == ("vit", "image")
    assert found["BertForSequenceClassification"] == ("bert", "sequence")
    assert found["LlamaForCausalLM"] == ("llama", "causal-lm")
    assert found["DeiTForImageClassificationWithTeacher"] == ("deit", "image")  # a type with two classes
    by_type = families(source="hf")
    assert sorted(n for names in by_type.values() for n in names) == sorted(found)
    assert set(families("gpt2", source="hf")["gpt2"]) == {"GPT2LMHeadModel", "GPT2ForSequenceClassification"}


def test_a_default_config_is_made_tiny_by_its_field_names():
    llama = tiny_config(transformers.AutoConfig.for_model("llama"))  # 32 layers, 32 heads, 4096 wide by default
    assert (llama.num_hidden_layers, llama.num_attention_heads, llama.hidden_size) == (LAYERS, HEADS, 64)
    assert llama.vocab_size == VOCAB and llama.head_dim == 16 and llama.intermediate_size == 128
    gpt2 = tiny_config(transformers.AutoConfig.for_model("gpt2"))  # aliases: n_layer, n_head, n_embd
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd) == (LAYERS, HEADS, 64)
    assert gpt2.bos_token_id < gpt2.vocab_size and gpt2.eos_token_id < gpt2.vocab_size  # 50256 by default


def test_tiny_configs_keep_what_the_architecture_needs():
    # per-stage heads divide the stage widths; the layer count of a staged model is its stage count
    swin = tiny_config(transformers.AutoConfig.for_model("swin"))
    assert list(swin.num_heads) == [1, 2, 4, 8] and swin.num_layers == 4 and swin.depths == [2, 2, 2, 2]
    assert swin.hidden_size == swin.embed_dim * 8
    # a hybrid keeps a layer of each kind (a Qwen3-Next of linear attention only has no attention mask)
    qwen = tiny_config(transformers.AutoConfig.for_model("qwen3_next"))
    assert set(qwen.layer_types) == {"linear_attention", "full_attention"}
    assert len(qwen.layer_types) == qwen.num_hidden_layers == LAYERS
    # widths copied from the hidden size follow it (DeBERTa's pooler)
    deberta = tiny_config(transformers.AutoConfig.for_model("deberta"))
    assert deberta.pooler_hidden_size == deberta.hidden_size == 64


def test_cases_feed_each_task_its_inputs_targets_and_loss():
    model, x, y, loss = create_case("GPT2LMHeadModel")
    assert x.shape == y.shape and (y[:, :-1] == x[:, 1:]).all() and loss is not None  # next tokens
    model, x, y, loss = create_case("BartForSequenceClassification")
    assert (x[:, -1] == model.config.eos_token_id).all() and y.shape == (2,) and loss is None
    model, x, y, loss = create_case("ViTForImageClassification")
    assert x.shape == (2, 3, 64, 64) and x.is_floating_point()


@pytest.mark.parametrize("name", ["LlamaForCausalLM", pytest.param("ViTForImageClassification", marks=pytest.mark.slow),
                                  pytest.param("BertForSequenceClassification", marks=pytest.mark.slow)])
def test_a_transformers_architecture_passes_every_zoo_stage(name):
    result = check_model(name, name, source="hf")
    assert result.ok, f"{name} fails at {result.failed}: {result.error}"
    assert result.passed == list(STAGES)
    assert result.layers == result.blocks == LAYERS  # one transformer layer per block
    assert result.axes_checked and not result.axes_wrong


def test_resuming_a_results_file_of_another_selection_is_refused_and_keeps_it(tmp_path, capsys):
    """A run rewrites its --json with its own models: resumed with another --filter, the other
    models' results would be lost."""
    from test_tools import _tool

    out = tmp_path / "zoo.json"
    out.write_text(json.dumps({"source": "hf", "filter": "*ForImageClassification*", "results": []}))
    before = out.read_text()
    code = _tool("zoo_check").main(["--source", "hf", "--filter", "gpt2", "--resume", "--json", str(out)])
    assert code == 2 and out.read_text() == before
    err = capsys.readouterr().err
    assert "holds a run of --source hf --filter '*ForImageClassification*'" in err and "another --json" in err
