import pytest
import torch
from conftest import tiny_config

from modeling_essm import ESSSMForSequenceClassification
from modeling_essm.export_essm import export_at_budget, export_onnx

onnxruntime = pytest.importorskip("onnxruntime")


def left_padded_batch(batch, seq_len, seed):
    """Token ids and a mask whose first row is left-padded to half its length."""
    input_ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : seq_len // 2] = 0
    return input_ids, attention_mask


# The filter length of tiny_config is 128: both ends of the dynamic sequence length are covered.
SHAPES = [(2, 40), (3, 7), (1, 128), (1, 1)]


def test_torch_export_matches_pytorch_at_any_length(causal_lm):
    k = 7
    input_ids, attention_mask = left_padded_batch(2, 40, 0)
    exported = export_at_budget(causal_lm, k, input_ids=input_ids, attention_mask=attention_mask).module()
    for seed, (batch, seq_len) in enumerate(SHAPES):
        input_ids, attention_mask = left_padded_batch(batch, seq_len, seed)
        with torch.no_grad():
            expected = causal_lm(input_ids, attention_mask=attention_mask, spectral_budget=k).logits
            got = exported(input_ids=input_ids, attention_mask=attention_mask)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_torch_export_of_a_classifier_on_real_valued_inputs():
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(input_size=3, num_labels=5)).eval()
    audio = torch.randn(2, 50, 3)
    exported = export_at_budget(model, 3, input_values=audio).module()
    longer = torch.randn(4, 90, 3)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_values=longer), model(input_values=longer, spectral_budget=3).logits,
                                   atol=1e-4, rtol=0)


def test_onnx_export_matches_pytorch_in_onnxruntime(causal_lm, tmp_path):
    k = 4
    input_ids, attention_mask = left_padded_batch(2, 40, 0)
    path = export_onnx(causal_lm, k, tmp_path / "essm-k4.onnx", input_ids=input_ids, attention_mask=attention_mask)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for seed, (batch, seq_len) in enumerate(SHAPES):
        input_ids, attention_mask = left_padded_batch(batch, seq_len, seed)
        (got,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        with torch.no_grad():
            expected = causal_lm(input_ids, attention_mask=attention_mask, spectral_budget=k).logits
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [1, 17])
def test_a_budget_out_of_range_fails_before_any_file_is_written(causal_lm, tmp_path, budget):
    path = tmp_path / "out" / "model.onnx"
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        export_onnx(causal_lm, budget, path, input_ids=left_padded_batch(2, 40, 0)[0])
    assert not (tmp_path / "out").exists()
