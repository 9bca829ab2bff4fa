"""Models of several inputs: token ids with their attention mask, an image with a metadata vector.

``example_inputs=(a, b)`` plans the model on all of them; every input is an activation (it differs
per sample), so one still needed later crosses the cuts beside the activations (a bundle) and the
aux nets' copies of later layers get it too. The invariants are those of one input: eval parity,
gradient isolation, a falling loss, ONNX parity in onnxruntime.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, Plan, export_onnx, load_auglocal, to_auglocal

from checks import assert_gradient_isolation
from handwritten import ImageWithMetadata, MaskedTextClassifier


def _convert(model, blocks, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(model, blocks, **kw)


def _text_batch(n: int = 6, t: int = 32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, t), generator=g)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # padded at the end, as a tokenizer pads
    return ids, mask, torch.randint(0, 5, (n,), generator=g)


@pytest.fixture(scope="module")
def text_net():
    torch.manual_seed(0)
    model = MaskedTextClassifier()
    ids, mask, _ = _text_batch()
    return model, _convert(model, 6, example_inputs=(ids, mask))


def test_a_text_classifier_of_ids_and_mask_converts_one_block_per_transformer_block(text_net):
    model, net = text_net
    c = net.plan.config
    assert c.inputs == 2 and (c.input_dtype, c.input_size, c.input_layout) == ("int64", [32], "nl")
    assert c.extra_inputs == [{"size": [32], "dtype": "bool", "layout": "nl"}]
    ends = [net.plan.layers[b.layers[-1]].name for b in net.plan.blocks]
    assert ends[-4:] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3..norm"], ends
    for layer in net.plan.layers[:-1]:  # the mask rides along with the tokens to every block that reads it
        assert layer.crossing[0] == [32] and layer.crossing_dtypes[0] == "bool", layer


def test_a_text_classifier_keeps_parity_isolation_and_learns(text_net):
    model, net = text_net
    ids, mask, y = _text_batch()
    with torch.no_grad():
        assert torch.equal(net.eval()(ids, mask), model.eval()(ids, mask))
        assert torch.equal(net(ids, mask=mask), model(ids, mask))  # by forward's name too
    assert_gradient_isolation(net, (ids, mask), y)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        losses.append(net.train().training_step((ids, mask), y).loss)
        opt.step()
    assert losses[-1] < losses[0] - 0.5, losses
    # the first aux net reads the mask too (its copies of later blocks attend with it), though the
    # embedding it learns from does not: more padding changes what it predicts
    other = mask.clone()
    other[:, 8:] = False
    with torch.no_grad():
        a, b = net.eval().head_outputs((ids, mask))[0], net.head_outputs((ids, other))[0]
    assert not torch.allclose(a, b)


def test_another_sequence_length_trains_and_a_mismatched_mask_fails_in_one_line(text_net):
    _, net = text_net
    ids, mask, y = _text_batch(t=16)
    net.train().training_step((ids, mask), y)  # both inputs at 16: checked on fake tensors, then run
    with pytest.raises(AugLocalError) as info:
        net.training_step((ids, mask[:, :8]), y)
    assert "\n" not in str(info.value)


def test_a_text_classifier_exports_with_both_inputs(text_net, tmp_path):
    import onnx

    _, net = text_net
    report = export_onnx(net.eval(), tmp_path / "text.onnx")
    assert report.max_abs_diff <= 1e-4
    assert [i.name for i in onnx.load(str(tmp_path / "text.onnx")).graph.input] == ["ids", "mask"]


def test_a_saved_plan_and_net_keep_both_inputs(text_net, tmp_path):
    model, net = text_net
    plan = Plan.from_yaml(net.plan.to_yaml())
    again = to_auglocal(model, plan=plan)
    ids, mask, _ = _text_batch()
    net.save(tmp_path / "net.pt")
    loaded = load_auglocal(tmp_path / "net.pt", model=MaskedTextClassifier())
    with torch.no_grad():
        want = model.eval()(ids, mask)
        assert torch.equal(again.eval()(ids, mask), want)
        assert torch.equal(loaded.eval()(ids, mask), want)


@pytest.mark.parametrize("call, message", [
    (lambda net, ids, mask, y: net(ids), "got 1 input"),
    (lambda net, ids, mask, y: net.training_step(ids, y), "converted with 2 input"),
    (lambda net, ids, mask, y: net.training_step((ids, mask, mask), y), "got 3"),
])
def test_the_wrong_number_of_inputs_is_one_line(text_net, call, message):
    _, net = text_net
    ids, mask, y = _text_batch()
    with pytest.raises(AugLocalError, match=message) as info:
        call(net, ids, mask, y)
    assert "\n" not in str(info.value)


def test_example_inputs_with_different_batches_are_refused():
    ids, mask, _ = _text_batch()
    with pytest.raises(AugLocalError, match="same batch") as info:
        to_auglocal(MaskedTextClassifier(), 3, example_inputs=(ids, mask[:2]))
    assert "\n" not in str(info.value)


def test_a_second_input_without_example_names_the_fix():
    with pytest.raises(AugLocalError, match=r"example_inputs=\(x, mask\)") as info:
        to_auglocal(MaskedTextClassifier(), 3, input_size=(32,))
    assert "\n" not in str(info.value)


def test_an_image_with_metadata_carries_the_vector_to_the_head(tmp_path):
    torch.manual_seed(0)
    model = ImageWithMetadata()
    x, meta, y = torch.randn(4, 3, 16, 16), torch.randn(4, 6), torch.randint(0, 4, (4,))
    net = _convert(model, 5, example_inputs=(x, meta))
    assert net.plan.config.extra_inputs == [{"size": [6], "dtype": "float32", "layout": "nc"}]
    assert len(net.plan.blocks) == 5
    for layer in net.plan.layers[:-1]:
        assert layer.crossing_layouts == ["nc", "nchw"], layer  # the metadata beside the map
    with torch.no_grad():
        assert torch.equal(net.eval()(x, meta), model.eval()(x, meta))
    assert_gradient_isolation(net, (x, meta), y)
    net.train().training_step((x, meta), y)
    assert export_onnx(net.eval(), tmp_path / "im.onnx").max_abs_diff <= 1e-4


class Pair(nn.Module):
    def forward(self, a, b):
        return a + b


def test_more_example_inputs_than_forward_takes_are_refused():
    with pytest.raises(AugLocalError, match="takes 2 positional") as info:
        to_auglocal(Pair(), 1, example_inputs=(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4)))
    assert "\n" not in str(info.value)
