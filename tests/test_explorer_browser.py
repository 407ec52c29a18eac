"""End to end: `essm-explore` serves a model and a real headless Chromium uses the page as a person would.

Run them alone with `python -m pytest -m browser`. They need Debian's chromium and chromium-driver, which
scripts/setup_browser.sh (part of the README's test command) installs; without them they are skipped.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import save_explorable_lm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from modeling_essm.training import load_run_config, train

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from explorer_browser import browser_missing, explorer_page  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))]
K = 16  # num_spectral_filters of tiny_config
PROMPT = "To be"


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    save_explorable_lm(folder)
    return folder


@pytest.fixture(scope="module")
def main_job_output(tmp_path_factory):
    """What the README's main job leaves (its config, far fewer steps): a ListOps classifier and its run config."""
    folder = tmp_path_factory.mktemp("main") / "listops"
    overrides = ["task.train_size=64", "task.eval_size=16", "training.max_steps=3", "training.eval_strategy=no",
                 "training.save_strategy=no", f"training.output_dir={folder}", "training.disable_tqdm=true"]
    train(load_run_config(REPO_ROOT / "configs" / "listops.yaml", overrides))
    return folder


@pytest.fixture(scope="module")
def lm_page(lm_folder):
    with explorer_page(lm_folder) as page:
        yield page


@pytest.fixture(scope="module")
def classifier_page(main_job_output):
    with explorer_page(main_job_output) as page:
        yield page


@torch.inference_mode()
def greedy_text(folder, budget, new_tokens):
    """What the model generates at `budget`, computed here, apart from the server."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    output = model.generate(input_ids, spectral_budget=budget, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def set_budget(page, budget):
    page.set_number("budget", budget)
    page.wait_until(lambda: page.text("budget-summary").startswith(f"k={budget}:"), f"the summary of k={budget}")


def generate(page, label, new_tokens=12):
    """Generates at the page's budget, whose `label` ("k=4", "k=2/16") tells the finished generation from the last."""
    page.set_number("new-tokens", new_tokens)
    page.type_text("prompt", PROMPT)
    page.click("generate")
    page.wait_until(lambda: page.text("generation-stats").startswith(f"{label} · {new_tokens} tokens") and
                    "peak memory" in page.text("generation-stats"), "the generation to finish")
    return page.value("generated"), page.text("generation-stats")


# --- a causal LM -------------------------------------------------------------------------------------------------


def test_moving_the_budget_updates_the_parameters_and_the_curve_marker(lm_page, lm_folder):
    model = AutoModelForCausalLM.from_pretrained(lm_folder)
    set_budget(lm_page, K)
    before = lm_page.curve_image()
    set_budget(lm_page, 4)
    summary = lm_page.text("budget-summary")
    assert f"{model.num_parameters_at_budget(4):,} of {model.num_parameters():,} parameters" in summary
    assert "bits per byte 2.600 in the sweep" in summary and "ms/token measured here" in summary
    lm_page.wait_until(lambda: lm_page.curve_image() != before, "the curve to move its marker")


def test_generation_is_the_models_text_at_the_budget_with_its_measured_cost(lm_page, lm_folder):
    model = AutoModelForCausalLM.from_pretrained(lm_folder)
    set_budget(lm_page, 4)
    text, stats = generate(lm_page, "k=4")
    assert text == greedy_text(lm_folder, 4, 12) and text
    assert stats.startswith("k=4") and "ms/token" in stats and "first after" in stats
    assert f"{model.num_parameters_at_budget(4):,} parameters in use" in stats


def test_side_by_side_generates_the_prompt_at_two_budgets(lm_page, lm_folder):
    set_budget(lm_page, 8)
    lm_page.set_number("second-budget", 2)
    lm_page.set_number("new-tokens", 10)
    lm_page.type_text("prompt", PROMPT)
    lm_page.click("compare")
    lm_page.wait_until(lambda: "peak memory" in lm_page.text("generation-stats-second"), "both generations")
    assert lm_page.value("generated") == greedy_text(lm_folder, 8, 10)
    assert lm_page.value("generated-second") == greedy_text(lm_folder, 2, 10)
    assert lm_page.text("generation-stats").startswith("k=8") and lm_page.text("generation-stats-second").startswith("k=2")


def shown(page, css):
    element = page.find(css)
    return element is not None and element.is_displayed()


def test_per_layer_budgets_are_set_one_slider_a_layer(lm_page, lm_folder):
    assert not shown(lm_page, "#layer-0")
    lm_page.click("per-layer")
    lm_page.wait_until(lambda: shown(lm_page, "#layer-0") and shown(lm_page, "#layer-1"), "the per-layer sliders")
    lm_page.set_number("layer-0", 2)
    lm_page.wait_until(lambda: lm_page.text("budget-summary").startswith(f"k=2/{K}:"), "the per-layer summary")
    text, stats = generate(lm_page, f"k=2/{K}", new_tokens=8)
    assert text == greedy_text(lm_folder, [2, K], 8) and stats.startswith(f"k=2/{K}")
    lm_page.click("per-layer")
    lm_page.wait_until(lambda: not shown(lm_page, "#layer-0"), "the per-layer sliders to hide")


def test_bad_inputs_show_their_message_and_the_server_goes_on(lm_page, lm_folder):
    lm_page.set_number("new-tokens", 12)
    lm_page.type_text("prompt", "")
    lm_page.click("generate")
    assert "the input is empty" in lm_page.error_message()
    lm_page.type_text("prompt", "x" * 120)  # the filters cover 128 tokens: 120 + 12 do not fit
    lm_page.click("generate")
    assert "the input is 120 tokens long; this model reads at most 116 here" in lm_page.error_message()
    set_budget(lm_page, 2)
    assert generate(lm_page, "k=2")[0] == greedy_text(lm_folder, 2, 12)


# --- the main job's classifier -----------------------------------------------------------------------------------


EXPRESSION = "[MAX 2 9 [MIN 4 7 ] 0 ]"


def predicted_label(folder, budget):
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        logits = model(tokenizer(EXPRESSION, return_tensors="pt").input_ids, spectral_budget=budget).logits
    return model.config.id2label[int(logits.argmax())]


def classify(page, budget):
    """Classifies at the page's budget, which tells the new prediction from the last."""
    page.click("classify")
    page.wait_until(lambda: page.text("classification-stats").startswith(f"k={budget}: predicts"), "the prediction")
    return page.text("classification-stats")


def test_the_classifier_shows_its_prediction_at_the_budget_and_at_the_full_budget(classifier_page, main_job_output):
    set_budget(classifier_page, 2)
    classifier_page.type_text("input-text", EXPRESSION)
    stats = classify(classifier_page, 2)
    label = predicted_label(main_job_output, 2)
    assert stats.startswith(f"k=2: predicts {label} from 9 tokens")
    assert classifier_page.top_label("prediction") == label
    assert classifier_page.top_label("prediction-full") == predicted_label(main_job_output, None)


def test_a_text_file_is_classified_like_the_typed_text(classifier_page, main_job_output, tmp_path):
    (tmp_path / "expression.txt").write_text(EXPRESSION)
    set_budget(classifier_page, 4)
    classifier_page.type_text("input-text", "")
    classifier_page.upload("input-file", tmp_path / "expression.txt")
    classifier_page.wait_until(lambda: classifier_page.find("#input-file [aria-label='expression.txt']"), "the upload")
    assert classify(classifier_page, 4).startswith(f"k=4: predicts {predicted_label(main_job_output, 4)} from 9 tokens")


def test_a_word_the_tokenizer_does_not_know_shows_its_message(classifier_page):
    if classifier_page.find("#input-file button[aria-label='Clear']"):
        classifier_page.find("#input-file button[aria-label='Clear']").click()
    classifier_page.type_text("input-text", "[MAX 2 x ]")
    classifier_page.click("classify")
    assert "the model's tokenizer cannot read this input" in classifier_page.error_message()


def test_the_quality_curve_is_measured_on_demand_with_the_budget_marked(classifier_page):
    set_budget(classifier_page, 8)
    assert "in the sweep" not in classifier_page.text("budget-summary")  # the run saved no sweep
    before = classifier_page.curve_image()
    classifier_page.click("measure")
    classifier_page.wait_until(lambda: "in the sweep" in classifier_page.text("budget-summary"), "the measured curve")
    assert classifier_page.text("budget-summary").startswith("k=8:") and "accuracy" in classifier_page.text("budget-summary")
    assert classifier_page.curve_image() != before
