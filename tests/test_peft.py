import pytest
import torch
from conftest import tiny_config
from tiny_trainer import NUM_FILTERS, tiny_trainer

from modeling_essm import ESSSMForCausalLM, ESSSMForSequenceClassification
from modeling_essm.budget import BudgetSampler

peft = pytest.importorskip("peft")

K = 16  # num_spectral_filters of tiny_config
# The names documented in docs/deploy.md: the Linear layers are LoRA modules; the stacked spectral
# projections M_j (an nn.Parameter of shape (K, D, D)) get one low-rank update per channel.
TARGET_MODULES = ["gate_in", "gate_out", "skip_proj", "fc_in", "fc_out"]
TARGET_PARAMETERS = ["mixer.spectral_proj"]
RANK = 2


def lora(model, init_lora_weights=False, **overrides):
    """LoRA on every supported target; random (non-zero) adapters unless asked otherwise, so they matter."""
    settings = dict(r=RANK, lora_alpha=4, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS,
                    init_lora_weights=init_lora_weights)
    settings.update(overrides)
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(**settings))


def merge_lora(adapted_model):
    """merge_and_unload, then merge the LoRA layers it leaves behind (the recipe of docs/deploy.md).

    peft (0.21) skips tuner layers nested inside another tuner layer: with `mixer.spectral_proj` targeted
    the whole mixer is wrapped, so `gate_in` and `skip_proj` keep their (unmerged, still active) LoRA.
    """
    merged = adapted_model.merge_and_unload()
    for name, module in list(merged.named_modules()):
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module.merge()
            merged.set_submodule(name, module.get_base_layer())
    return merged


def tokens(batch=2, seq_len=30, seed=0):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def logits_at_every_budget(model, x, low=2, high=K):
    with torch.no_grad():
        return {k: model(input_ids=x, spectral_budget=k).logits for k in range(low, high + 1)}


def assert_merged_equals_adapted(adapted, merged_model, x, high=K):
    merged = logits_at_every_budget(merged_model, x, high=high)
    for k in adapted:
        # A target whose update the forward ignored would still be merged into the weights and differ here.
        torch.testing.assert_close(merged[k], adapted[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target_parameters", [None, TARGET_PARAMETERS], ids=["linear-layers", "and-spectral-proj"])
def test_every_target_is_adapted_and_merging_keeps_the_outputs_at_every_budget(config, target_parameters):
    torch.manual_seed(0)
    model = ESSSMForCausalLM(config).eval()
    clean_keys = set(model.state_dict())
    x = tokens()
    base = logits_at_every_budget(model, x)
    adapted_model = lora(model, target_parameters=target_parameters)
    adapted = logits_at_every_budget(adapted_model, x)
    for k in adapted:
        assert (adapted[k] - base[k]).abs().max() > 1e-3  # the adapters act at this budget
    merged_model = adapted_model.merge_and_unload() if target_parameters is None else merge_lora(adapted_model)
    assert set(merged_model.state_dict()) == clean_keys  # a plain ES-SSM again: no LoRA layer left
    assert_merged_equals_adapted(adapted, merged_model, x)


def test_the_local_convolution_trains_in_full_through_modules_to_save(causal_lm):
    x = tokens()
    with torch.no_grad():
        base = causal_lm(input_ids=x).logits
    adapted_model = lora(causal_lm, init_lora_weights=True, target_parameters=None, modules_to_save=["local_conv"])
    trainable = [name for name, parameter in adapted_model.named_parameters() if parameter.requires_grad]
    assert sum("local_conv" in name for name in trainable) == 2 * causal_lm.config.num_hidden_layers  # weight, bias
    with torch.no_grad():
        for module in adapted_model.modules():
            if isinstance(module, peft.utils.ModulesToSaveWrapper):
                module.modules_to_save["default"].weight.add_(0.5)
        adapted = adapted_model(input_ids=x).logits
    assert (adapted - base).abs().max() > 1e-3  # the trained copy is the one the forward uses
    with torch.no_grad():
        torch.testing.assert_close(adapted_model.merge_and_unload()(input_ids=x).logits, adapted)


def test_gate_out_as_a_lora_module(causal_lm):
    x = tokens()
    adapted_model = lora(causal_lm, target_modules=["gate_out"], target_parameters=None)
    adapted = adapted_model(input_ids=x, spectral_budget=4).logits
    merged = adapted_model.merge_and_unload()(input_ids=x, spectral_budget=4).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 8])
def test_channels_above_the_budget_never_influence_the_adapted_model(causal_lm, k):
    x = tokens()
    adapted_model = lora(causal_lm)
    adapted_model(input_ids=x, spectral_budget=k).logits.logsumexp(-1).mean().backward()
    for name, module in adapted_model.named_modules():
        if isinstance(module, peft.tuners.lora.ParamWrapper):  # the per-channel LoRA of spectral_proj
            lora_a, lora_b = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
            # peft lays the channel ("expert") axis out as rows j*r..(j+1)*r of A and columns i*K + j of B.
            assert torch.count_nonzero(lora_a.reshape(K, RANK, -1)[k:]) == 0, name
            assert torch.count_nonzero(lora_b.reshape(-1, RANK, K)[..., k:]) == 0, name
            assert lora_a.reshape(K, RANK, -1)[:k].abs().sum() > 0, name
    with torch.no_grad():
        expected = adapted_model(input_ids=x, spectral_budget=k).logits
        for layer in adapted_model.get_base_model().model.layers:
            mixer = layer.mixer.get_base_layer()
            mixer.spectral_proj[k:].normal_()
            mixer.gate_out.weight[k:].normal_()
            mixer.gate_out.bias[k:].normal_()
        assert torch.equal(adapted_model(input_ids=x, spectral_budget=k).logits, expected)
        compact = merge_lora(adapted_model).slice_to_budget(k)  # has no channels above k at all
        torch.testing.assert_close(compact(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_fine_tune_with_the_trainer_and_the_budget_callback(tmp_path):
    torch.manual_seed(0)
    model = ESSSMForSequenceClassification(tiny_config(num_spectral_filters=NUM_FILTERS, num_labels=3))
    adapted_model = lora(model, init_lora_weights=True, task_type="SEQ_CLS")  # the usual start: B = 0
    base_before = {name: p.detach().clone() for name, p in adapted_model.named_parameters() if not p.requires_grad}
    lora_before = {name: p.detach().clone() for name, p in adapted_model.named_parameters() if "lora_B" in name}
    trainer = tiny_trainer(tmp_path, model=adapted_model, max_steps=6, learning_rate=1e-2)
    seen = []  # the budget each training forward pass of the backbone received, through the PEFT wrappers
    backbone = adapted_model.get_base_model().model
    backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["spectral_budget"]) if m.training else None,
                                       with_kwargs=True)
    trainer.train()
    sampler = BudgetSampler("uniform", num_filters=NUM_FILTERS, full_every=0, seed=0)
    assert seen == [sampler(step) for step in range(6)] and len(set(seen)) > 1
    for name, before in base_before.items():
        assert torch.equal(adapted_model.get_parameter(name), before), f"frozen {name} changed"
    assert all(not torch.equal(adapted_model.get_parameter(name), before) for name, before in lora_before.items())
    adapted_model.eval()
    x = torch.randint(1, 16, (2, 20))
    adapted = logits_at_every_budget(adapted_model, x, high=NUM_FILTERS)
    assert_merged_equals_adapted(adapted, merge_lora(adapted_model), x, high=NUM_FILTERS)


@pytest.mark.parametrize("target_parameters", [None, TARGET_PARAMETERS], ids=["linear-layers", "and-spectral-proj"])
def test_cached_generation_of_an_adapted_model_equals_its_uncached_forward(target_parameters):
    torch.manual_seed(0)
    adapted = lora(ESSSMForCausalLM(tiny_config()).eval(), target_parameters=target_parameters)
    prompt = tokens(1, 12)
    with torch.no_grad():
        generated = adapted.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                     spectral_budget=6)
        expected = prompt
        for _ in range(8):  # greedy decoding by whole-sequence forwards, no cache
            next_token = adapted(input_ids=expected, spectral_budget=6).logits[:, -1:].argmax(-1)
            expected = torch.cat([expected, next_token], 1)
    assert torch.equal(generated, expected)
