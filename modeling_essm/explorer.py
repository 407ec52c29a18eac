"""Budget explorer: a Gradio app that shows what one ES-SSM gives and costs at every spectral budget.

`essm-explore MODEL` serves it for a saved model (a folder or a Hub id). A causal LM generates, streamed token by
token, at the chosen budget (uniform or one per layer), with the measured ms/token, the parameters in use and the
peak memory beside the text; it can also generate the same prompt at a second budget. A classifier shows its label
distribution at the chosen budget and at the full one. Beside both: the model's budget-quality curve (the sweep
saved with it, or measured on demand) and the cost curve measured on this machine, with the chosen budget marked.

This file imports only torch, transformers, gradio, matplotlib and huggingface_hub, so that a Hugging Face Space
runs it as it is beside an `app.py` (see `essm-explore --write-space`); there the model's own code loads with it
(`trust_remote_code`). Measuring the quality curve on demand needs the installed package and evaluation data.
"""

import functools
import json
import os
import queue
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app may run offline

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402  (figures without pyplot: handlers run in threads)
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

try:  # the installed package registers the Auto classes: its code runs, not the copy saved beside the weights
    import modeling_essm  # noqa: F401

    REMOTE_CODE = False
except ImportError:  # a Space without the package: the model's own code, pushed with it
    REMOTE_CODE = True

SWEEP_FILE = "budget_sweep.json"
COST_REPEATS = 3  # timed rounds over the budgets of the cost curve (the median is shown)
DEFAULT_NEW_TOKENS = 48
UPDATE_SECONDS = 0.1  # a streamed generation updates the page at most this often


class ExplorerError(ValueError):
    """A model or an input the explorer refuses; the message says why and what is valid."""


# --- the model -----------------------------------------------------------------------------------------------------


@dataclass
class Explored:
    """A loaded ES-SSM and what the app shows about it."""

    name: str
    model: torch.nn.Module
    tokenizer: object | None  # None: inputs are token ids typed as numbers
    sweep: list | None  # rows of budget_sweep.json: {"budget", metric, ...}
    data: str | None = None  # evaluation data for a sweep measured on demand
    costs: list = field(default_factory=list)  # the cost curve, measured once

    @property
    def config(self):
        return self.model.config

    @property
    def causal_lm(self) -> bool:
        return self.model.can_generate()

    @property
    def budgets(self) -> list[int]:
        """Uniform budgets of the curves: every power of two in range, and both ends."""
        low, high = self.config.min_spectral_budget, self.config.num_spectral_filters
        powers = [2**i for i in range(high.bit_length()) if low <= 2**i <= high]
        return sorted({low, *powers, high})


def check_is_essm(model_id: str):
    """The config of `model_id`, or ExplorerError when it is no folder or model the explorer can show."""
    local = Path(model_id)
    if local.exists() and not (local / "config.json").is_file():
        raise ExplorerError(f"{model_id} holds no saved model (config.json): pass a folder written by save_pretrained "
                            "or essm-train, or a Hub id")
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=REMOTE_CODE)
    except (OSError, ValueError) as error:
        raise ExplorerError(f"cannot read the config of {model_id}: {error}") from None
    if config.model_type != "essm":
        raise ExplorerError(f"{model_id} is not an ES-SSM: its config has model_type={config.model_type!r}, not 'essm'")
    architecture = (config.architectures or ["ESSSMModel"])[0]
    if not architecture.endswith(("ForCausalLM", "ForSequenceClassification")):
        raise ExplorerError(f"{model_id} is a {architecture}: the explorer shows a causal LM or a sequence classifier")
    if config.input_size is not None:
        raise ExplorerError(f"{model_id} reads real-valued inputs (input_size={config.input_size}); the explorer "
                            "takes text or token ids")
    return config


def load_sweep(model_id: str) -> list | None:
    """The rows of the budget sweep saved beside the model (a folder's file, or the Hub repository's), if any."""
    path = Path(model_id) / SWEEP_FILE
    if not path.is_file():
        if Path(model_id).exists():
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(model_id, SWEEP_FILE))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
            return None
    rows = json.loads(path.read_text()).get("results") or None
    return sorted(rows, key=lambda row: row["budget"]) if rows else None


def load_explored(model_id: str, data: str | None = None, device: str | None = None) -> Explored:
    config = check_is_essm(model_id)
    causal_lm = config.architectures[0].endswith("ForCausalLM")
    auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = auto_class.from_pretrained(model_id, trust_remote_code=REMOTE_CODE).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=REMOTE_CODE)
    except (OSError, ValueError, TypeError):  # no tokenizer saved: token ids are typed instead
        tokenizer = None
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        tokenizer = None  # not this model's (e.g. the default byte tokenizer of a model with another vocabulary)
    name = Path(model_id).name if Path(model_id).exists() else model_id
    return Explored(name=name, model=model, tokenizer=tokenizer, sweep=load_sweep(model_id), data=data)


# --- inputs --------------------------------------------------------------------------------------------------------


def chosen_budget(explored: Explored, uniform, per_layer: bool, layers) -> int | list[int]:
    """The budget the controls set: one integer, or one per layer; checked against the model."""
    budget = [int(k) for k in layers] if per_layer else int(uniform)
    try:
        explored.model.sliced_config(budget)  # checks the budget like every forward does
    except ValueError as error:
        raise ExplorerError(str(error)) from None
    return budget


def budget_label(budget) -> str:
    return f"k={budget}" if isinstance(budget, int) else "k=" + "/".join(str(k) for k in budget)


def encode(explored: Explored, text: str, room: int) -> torch.Tensor:
    """(1, T) token ids of `text`, or ExplorerError when it is empty, unreadable or longer than `room` tokens."""
    if not text or not text.strip():
        raise ExplorerError("the input is empty: type a text" + (" (token ids)" if explored.tokenizer is None else ""))
    if explored.tokenizer is None:
        vocab = explored.config.vocab_size
        try:
            ids = [int(token) for token in text.split()]
        except ValueError:
            raise ExplorerError(f"this model has no tokenizer: type token ids, integers in [0, {vocab - 1}] "
                                "separated by spaces") from None
        if not all(0 <= i < vocab for i in ids):
            raise ExplorerError(f"token ids must be in [0, {vocab - 1}]")
    else:
        try:
            ids = explored.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as error:  # a tokenizer's own error (e.g. a word outside its vocabulary)
            raise ExplorerError(f"the model's tokenizer cannot read this input: {error}") from None
    if len(ids) > room:
        raise ExplorerError(f"the input is {len(ids)} tokens long; this model reads at most {room} here "
                            f"(max_position_embeddings={explored.config.max_position_embeddings})")
    return torch.tensor([ids], device=explored.model.device)


def decode(explored: Explored, ids: list[int]) -> str:
    if explored.tokenizer is None:
        return " ".join(str(i) for i in ids)
    return explored.tokenizer.decode(ids, skip_special_tokens=True)


# --- measuring -----------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory above the start while the block runs, in MB: the CUDA allocator's peak, or on Linux the process's
    peak resident set (reset through /proc/self/clear_refs); None where neither can be read."""

    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.STATUS.is_file():
            Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current resident set
            self.start = self.resident_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.STATUS.is_file():
            self.peak_mb = (self.resident_kb("VmHWM") * 1024 - self.start) / 2**20

    def resident_kb(self, name: str) -> int:
        return int(re.search(rf"{name}:\s+(\d+)", self.STATUS.read_text()).group(1))


class TimedStreamer(BaseStreamer):
    """Hands each generated token to a queue with the time it came; `generate` first puts the prompt."""

    def __init__(self):
        self.tokens, self.seen_prompt = queue.Queue(), False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.tokens.put((time.perf_counter(), value.reshape(-1).tolist()))

    def end(self):
        self.tokens.put(None)


@torch.inference_mode()
def time_forward(model, inputs, budget) -> float:
    """Seconds of one forward at `budget`."""
    start = time.perf_counter()
    model(**inputs, spectral_budget=budget)
    return time.perf_counter() - start


def generated_tokens(model, input_ids: torch.Tensor, budget, max_new_tokens: int, sampling: dict):
    """Yields (arrival time, token ids) of each token as `generate` makes it at `budget` in a thread; a failure of
    `generate` is raised after the tokens it made."""
    streamer, failure = TimedStreamer(), []

    def run():
        try:
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), spectral_budget=budget,
                           max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        except Exception as error:  # noqa: BLE001  raised below, in the caller's thread
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (item := streamer.tokens.get()) is not None:
        yield item
    thread.join()
    if failure:
        raise failure[0]


def gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive token arrivals (the prompt's prefill comes before the first)."""
    return [later - earlier for earlier, later in zip(times, times[1:])]


def decoding_gaps(model, budget, prompt_length=16, new_tokens=8) -> list[float]:
    """Seconds between the tokens of one greedy `generate` after a prompt, as the app's generations measure them."""
    prompt = torch.zeros(1, prompt_length, dtype=torch.long, device=model.device)
    return gaps([arrival for arrival, _ in generated_tokens(model, prompt, budget, new_tokens, {"do_sample": False})])


def cost_curve(explored: Explored) -> list[dict]:
    """ms per generated token (an LM) or per sequence of the longest length (a classifier), and the parameters in
    use, at each budget of the curve, measured on this machine."""
    model, budgets = explored.model, explored.budgets
    sequence = {"input_ids": torch.zeros(1, explored.config.max_position_embeddings, dtype=torch.long,
                                         device=model.device)}

    def seconds(budget) -> list[float]:
        if explored.causal_lm:
            return decoding_gaps(model, budget)
        return [time_forward(model, sequence, budget)]

    for budget in budgets:  # warm-up: first calls allocate
        seconds(budget)
    measured = {budget: [] for budget in budgets}
    for _ in range(COST_REPEATS):  # budgets take turns, so a slow spell of the machine hits them all alike
        for budget in budgets:
            measured[budget] += seconds(budget)
    return [{"budget": budget, "ms": 1e3 * statistics.median(measured[budget]),
             "parameters": model.num_parameters_at_budget(budget)} for budget in budgets]


def cost_unit(explored: Explored) -> str:
    return "ms/token" if explored.causal_lm else f"ms/sequence ({explored.config.max_position_embeddings} tokens)"


def measure_sweep(explored: Explored, model_id: str, samples: int) -> list[dict]:
    """The quality at each budget of the curve on `samples` evaluation examples (the package's budget sweep)."""
    try:
        from modeling_essm.evaluation import evaluation_data, sweep_budgets
    except ImportError:
        raise ExplorerError("measuring the curve needs the package with its train extra: "
                            "pip install 'modeling_essm[explore,train]'") from None
    try:
        dataset, collator, causal_lm, _ = evaluation_data(model_id, explored.data, samples)
    except (OSError, ValueError) as error:
        raise ExplorerError(f"no evaluation data for the curve ({error}); start the explorer with --data FILE") from None
    return sweep_budgets(explored.model, dataset, collator, explored.budgets, batch_size=16, causal_lm=causal_lm)


# --- the picture ---------------------------------------------------------------------------------------------------


def metric_of(rows) -> str:
    # evaluation.metric_name's rule, restated: this file imports nothing of the package, so that a Space runs it.
    return "accuracy" if "accuracy" in rows[0] else "bits_per_byte"


def curve_figure(explored: Explored, budget) -> Figure:
    """Quality (when a sweep is known) and measured cost against the budget, the chosen budget marked."""
    figure = Figure(figsize=(9, 3.4), dpi=100)
    quality, cost = figure.subplots(1, 2)
    span = (budget, budget) if isinstance(budget, int) else (min(budget), max(budget))
    if explored.sweep:
        metric = metric_of(explored.sweep)
        budgets = [row["budget"] for row in explored.sweep]
        values = [row[metric] for row in explored.sweep]
        quality.plot(budgets, values, marker="o", color="tab:blue")
        quality.set_ylabel(metric.replace("_", " "))
    else:
        quality.text(0.5, 0.5, "no sweep saved with this model:\nmeasure it below", ha="center", va="center",
                     transform=quality.transAxes)
    quality.set_title("quality")  # saved with the model or measured here
    budgets = [row["budget"] for row in explored.costs]
    cost.plot(budgets, [row["ms"] for row in explored.costs], marker="s", color="tab:orange")
    cost.set(ylabel=cost_unit(explored), title="cost on this machine")
    parameters = cost.twinx()
    parameters.plot(budgets, [row["parameters"] / 1e6 for row in explored.costs], marker="o", color="tab:green")
    parameters.set_ylabel("parameters (M)", color="tab:green")
    for axis in (quality, cost):
        axis.set_xscale("log", base=2)
        axis.set_xticks(explored.budgets, [str(k) for k in explored.budgets])
        axis.set_xlabel("spectral budget k")
        axis.grid(alpha=0.3)
        axis.axvspan(span[0] * 0.97, span[1] * 1.03, color="tab:red", alpha=0.25)
        axis.axvline(span[1], color="tab:red", linewidth=1.5)
    figure.tight_layout()
    return figure


def budget_summary(explored: Explored, budget) -> str:
    """The marked budget in words: parameters in use and, for a uniform budget on the curve, its quality and cost."""
    model = explored.model
    used, total = model.num_parameters_at_budget(budget), model.num_parameters()
    parts = [f"**{budget_label(budget)}**: {used:,} of {total:,} parameters in use ({used / total:.0%})"]
    rows = {row["budget"]: row for row in explored.sweep or ()}
    if isinstance(budget, int) and budget in rows:
        metric = metric_of(explored.sweep)
        parts.append(f"{metric.replace('_', ' ')} {rows[budget][metric]:.3f} in the sweep")
    costs = {row["budget"]: row for row in explored.costs}
    if isinstance(budget, int) and budget in costs:
        parts.append(f"{costs[budget]['ms']:.2f} {cost_unit(explored)} measured here")
    return "; ".join(parts)


# --- the handlers --------------------------------------------------------------------------------------------------


def user_errors_shown(handler):
    """A refused input shows its message in the page; any other failure shows too, and the server goes on."""

    @functools.wraps(handler)  # Gradio reads the handler's signature (a gr.Progress default is filled in)
    def shown(*args, **kwargs):
        try:
            result = handler(*args, **kwargs)
            if hasattr(result, "__next__"):
                yield from result
            else:
                yield result
        except ExplorerError as error:
            raise gr.Error(str(error)) from None
        except Exception as error:  # noqa: BLE001  one failed request must not end the server
            raise gr.Error(f"{type(error).__name__}: {error}") from None

    return shown


def stream_generation(explored: Explored, prompt: str, budget, max_new_tokens: int, temperature: float):
    """Yields (text so far, stats) while `generate` runs at `budget` in a thread."""
    if not 1 <= max_new_tokens <= explored.config.max_position_embeddings - 1:
        raise ExplorerError(f"new tokens must be in [1, {explored.config.max_position_embeddings - 1}]")
    input_ids = encode(explored, prompt, explored.config.max_position_embeddings - max_new_tokens)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    parameters = explored.model.num_parameters_at_budget(budget)  # once: the loop must not slow the generation
    ids, times = [], [time.perf_counter()]
    shown = times[0]
    with PeakMemory(explored.model.device) as memory:
        for arrival, new_ids in generated_tokens(explored.model, input_ids, budget, max_new_tokens, sampling):
            times.append(arrival)
            ids += new_ids
            if arrival - shown >= UPDATE_SECONDS:
                # Each update costs the page's server time under the GIL, which would slow the generation it times.
                shown = arrival
                yield decode(explored, ids), generation_stats(budget, times, parameters, None)
    yield decode(explored, ids), generation_stats(budget, times, parameters, memory.peak_mb)


def generation_stats(budget, times: list[float], parameters: int, peak_mb) -> str:
    """`times`: the start, then each token's arrival; the first gap is the prompt's prefill."""
    tokens = len(times) - 1
    parts = [f"{budget_label(budget)}", f"{tokens} tokens"]
    if tokens >= 1:
        parts.append(f"first after {1e3 * (times[1] - times[0]):.0f} ms")
    if tokens >= 2:
        parts.append(f"**{1e3 * statistics.median(gaps(times[1:])):.2f} ms/token**")
    parts.append(f"{parameters:,} parameters in use")
    if peak_mb is not None:
        parts.append(f"peak memory +{peak_mb:.1f} MB")
    return " · ".join(parts)


@torch.inference_mode()
def label_distribution(explored: Explored, input_ids: torch.Tensor, budget) -> dict[str, float]:
    probabilities = explored.model(input_ids, spectral_budget=budget).logits.float().softmax(-1)[0]
    return {explored.config.id2label.get(i, f"LABEL_{i}"): float(p) for i, p in enumerate(probabilities)}


def read_input(text: str, file) -> str:
    """The typed text, or the uploaded file's (UTF-8) when a file is given."""
    if file is None:
        return text
    path = Path(file if isinstance(file, str) else file.name)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ExplorerError(f"{path.name} is not a UTF-8 text file") from None


# --- the app -------------------------------------------------------------------------------------------------------


def model_overview(explored: Explored) -> str:
    config = explored.config
    kind = "causal LM" if explored.causal_lm else f"classifier ({config.num_labels} labels)"
    inputs = "text" if explored.tokenizer is not None else "token ids (no tokenizer saved)"
    return (f"# ES-SSM budget explorer: {explored.name}\n"
            f"A {kind}: {config.num_hidden_layers} blocks of width {config.hidden_size}, spectral budgets "
            f"{config.min_spectral_budget} to {config.num_spectral_filters}, sequences up to "
            f"{config.max_position_embeddings} tokens, {explored.model.num_parameters():,} parameters; reads {inputs}.")


def build_app(explored: Explored, model_id: str, curve_samples: int = 200) -> gr.Blocks:
    """The explorer's page for one loaded model."""
    config = explored.config
    low, high = config.min_spectral_budget, config.num_spectral_filters
    layer_highs = config.layer_spectral_filters
    if not explored.costs:
        explored.costs = cost_curve(explored)

    with gr.Blocks(title=f"ES-SSM explorer: {explored.name}") as app:
        gr.Markdown(model_overview(explored))
        with gr.Row():
            with gr.Column(scale=1):
                uniform = gr.Slider(low, high, value=high, step=1, label="spectral budget k", elem_id="budget")
                per_layer = gr.Checkbox(label="one budget per layer", value=False, elem_id="per-layer")
                with gr.Group(visible=False) as layer_group:
                    layers = [gr.Slider(low, layer_high, value=layer_high, step=1, label=f"layer {i} budget",
                                        elem_id=f"layer-{i}") for i, layer_high in enumerate(layer_highs)]
                summary = gr.Markdown(budget_summary(explored, high), elem_id="budget-summary")
            with gr.Column(scale=2):
                curve = gr.Plot(curve_figure(explored, high), show_label=False, elem_id="curve")
                measure = gr.Button("Measure the quality curve" if not explored.sweep else "Measure it again here",
                                    elem_id="measure")
        controls = [uniform, per_layer, *layers]

        def budget_of(uniform_value, per_layer_value, *layer_values):
            return chosen_budget(explored, uniform_value, per_layer_value, layer_values)

        def budget_view(*values):
            budget = budget_of(*values)
            return budget_summary(explored, budget), curve_figure(explored, budget)

        @user_errors_shown
        def measure_curve(*values, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc="measuring quality at every budget")
            explored.sweep = measure_sweep(explored, model_id, curve_samples)
            return budget_view(*values)

        per_layer.change(lambda on: gr.Group(visible=on), per_layer, layer_group)
        for control in controls:
            control.change(user_errors_shown(budget_view), controls, [summary, curve], api_name="show_budget")
        measure.click(measure_curve, controls, [summary, curve], api_name="measure_curve")

        if explored.causal_lm:
            add_generation(explored, controls, budget_of)
        else:
            add_classification(explored, controls, budget_of)
    return app


def add_generation(explored: Explored, controls, budget_of):
    config = explored.config
    with gr.Row():
        prompt = gr.Textbox(label="prompt", lines=3, elem_id="prompt",
                            placeholder="a text" if explored.tokenizer else "token ids separated by spaces")
    with gr.Row():
        new_tokens = gr.Slider(1, config.max_position_embeddings - 1,
                               value=min(DEFAULT_NEW_TOKENS, config.max_position_embeddings - 1), step=1,
                               label="new tokens", elem_id="new-tokens")
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
        second = gr.Slider(config.min_spectral_budget, config.num_spectral_filters, value=config.min_spectral_budget,
                           step=1, label="second budget (side by side)", elem_id="second-budget")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        compare = gr.Button("Generate at both budgets", elem_id="compare")
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(label="generated at the chosen budget", lines=6, elem_id="generated")
            stats = gr.Markdown(elem_id="generation-stats")
        with gr.Column():
            text_second = gr.Textbox(label="generated at the second budget", lines=6, elem_id="generated-second")
            stats_second = gr.Markdown(elem_id="generation-stats-second")

    @user_errors_shown
    def generate_one(prompt_text, tokens, temp, *values):
        yield from stream_generation(explored, prompt_text, budget_of(*values), int(tokens), float(temp))

    @user_errors_shown
    def generate_both(prompt_text, tokens, temp, second_budget, *values):
        first = ("", "")
        for first in stream_generation(explored, prompt_text, budget_of(*values), int(tokens), float(temp)):
            yield *first, "", ""
        second_run = chosen_budget(explored, second_budget, False, ())
        for output in stream_generation(explored, prompt_text, second_run, int(tokens), float(temp)):
            yield *first, *output

    generate.click(generate_one, [prompt, new_tokens, temperature, *controls], [text, stats], api_name="generate")
    compare.click(generate_both, [prompt, new_tokens, temperature, second, *controls],
                  [text, stats, text_second, stats_second], api_name="compare")


def add_classification(explored: Explored, controls, budget_of):
    config = explored.config
    with gr.Row():
        text = gr.Textbox(label="input", lines=3, elem_id="input-text",
                          placeholder="a text" if explored.tokenizer else "token ids separated by spaces")
        upload = gr.File(label="or a text file", file_types=["text"], elem_id="input-file")
    classify = gr.Button("Classify", variant="primary", elem_id="classify")
    with gr.Row():
        chosen = gr.Label(label="at the chosen budget", num_top_classes=5, elem_id="prediction")
        full = gr.Label(label=f"at the full budget (k={config.num_spectral_filters})", num_top_classes=5,
                        elem_id="prediction-full")
    stats = gr.Markdown(elem_id="classification-stats")

    @user_errors_shown
    def classify_input(input_text, input_file, *values):
        budget = budget_of(*values)
        input_ids = encode(explored, read_input(input_text, input_file), config.max_position_embeddings)
        start = time.perf_counter()
        at_budget = label_distribution(explored, input_ids, budget)
        ms = 1e3 * (time.perf_counter() - start)
        at_full = label_distribution(explored, input_ids, None)
        top = max(at_budget, key=at_budget.get)
        return at_budget, at_full, (f"{budget_label(budget)}: predicts **{top}** from {input_ids.shape[1]} tokens "
                                    f"in {ms:.1f} ms, {explored.model.num_parameters_at_budget(budget):,} parameters "
                                    "in use")

    classify.click(classify_input, [text, upload, *controls], [chosen, full, stats], api_name="classify")
