"""Budget dropout: train one ES-SSM that runs at any spectral budget (the ES-SSM paper's training).

Every optimizer step runs at one spectral budget ``k`` drawn by a :class:`BudgetSampler`.
The draw is a pure function of ``(seed, step)``: every DDP rank, every micro-batch of a
gradient-accumulation step and a resumed run all see the same budget without any
communication or saved state. :class:`BudgetSamplingCallback` applies the draw to a
``transformers.Trainer`` run.
"""

import math
import random
from collections import Counter
from functools import partial

from transformers import TrainerCallback


DEFAULT_BUDGET_GRID = (2, 3, 4, 6, 8, 12, 16, 24, 32)
SCHEDULES = ("paper", "uniform", "fixed")
# u' = 1 - (1 - u) ** (1 / bias): the paper's 0.6 pushes the log-uniform draw towards large budgets.
PAPER_BIAS = 0.6


def default_budget_grid(num_filters, min_budget=2):
    """The reference grid clipped to ``[min_budget, num_filters]``, with ``num_filters`` itself always in it."""
    return tuple(sorted({k for k in DEFAULT_BUDGET_GRID if min_budget <= k <= num_filters} | {num_filters}))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class BudgetSampler:
    """Draws the spectral budget of each optimizer step.

    Schedules:
      - ``"paper"``: the reference schedule. Steps ``< warmup_steps`` and every ``full_every``-th step
        (steps ``full_every - 1``, ``2 * full_every - 1``, ... counted from 0) use the full budget K.
        Otherwise draw ``u ~ U(0, 1)``, bias it with ``u' = 1 - (1 - u) ** (1 / bias)`` (the paper's ``bias=0.6``
        favours large budgets, 1 is log-uniform, above 1 favours small budgets),
        map it log-uniformly onto ``[min_budget, K]`` and snap to the nearest grid value (ties to the smaller).
      - ``"uniform"``: like ``"paper"`` but the free steps draw uniformly from the grid.
      - ``"fixed"``: always ``fixed_budget`` (the non-elastic ablation).

    ``per_layer=True`` gives each of the ``num_layers`` layers its own draw on the free steps (a tuple, one budget
    per layer; the first layer's is the draw ``per_layer=False`` would make), so that training meets the per-layer
    plans a deployment may run (see ``modeling_essm.planner``).

    ``sampler(step)`` depends only on ``(seed, step)`` and the settings: no state is kept between calls.
    ``full_every=0`` never forces the full budget.
    """

    def __init__(
        self,
        schedule="paper",
        num_filters=32,
        min_budget=2,
        grid=None,
        warmup_steps=0,
        full_every=8,
        fixed_budget=None,
        seed=0,
        bias=PAPER_BIAS,
        per_layer=False,
        num_layers=1,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown budget schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
        _check_int("num_filters", num_filters, 2)
        _check_int("min_budget", min_budget, 1)
        if min_budget > num_filters:
            raise ValueError(f"min_budget ({min_budget}) must not exceed num_filters ({num_filters})")
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("full_every", full_every, 0)
        _check_int("seed", seed, 0)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not 0 < bias < math.inf:
            raise ValueError(f"bias must be a positive number (0.6: the paper's lean to large budgets), got {bias!r}")
        if not isinstance(per_layer, bool):
            raise ValueError(f"per_layer must be true or false, got {per_layer!r}")
        _check_int("num_layers", num_layers, 1)
        self.schedule = schedule
        self.per_layer = per_layer
        self.num_layers = num_layers
        self.num_filters = num_filters
        self.min_budget = min_budget
        self.grid = self._validated_grid(grid)
        self.warmup_steps = warmup_steps
        self.full_every = full_every
        self.fixed_budget = self._validated_fixed_budget(fixed_budget)
        self.seed = seed
        self.bias = float(bias)

    @classmethod
    def from_config(cls, config, **kwargs):
        """A sampler matching an ``ESSSMConfig``'s K, minimum budget and number of layers."""
        return cls(num_filters=config.num_spectral_filters, min_budget=config.min_spectral_budget,
                   num_layers=config.num_hidden_layers, **kwargs)

    def _validated_grid(self, grid):
        if grid is None:
            return default_budget_grid(self.num_filters, self.min_budget)
        grid = list(grid)
        if not grid:
            raise ValueError("the budget grid must not be empty")
        for k in grid:
            if isinstance(k, bool) or not isinstance(k, int) or not self.min_budget <= k <= self.num_filters:
                raise ValueError(
                    f"budget grid value {k!r} is outside [min_budget, num_filters] = [{self.min_budget}, {self.num_filters}]"
                )
        return tuple(sorted(set(grid)))

    def _validated_fixed_budget(self, fixed_budget):
        if self.schedule != "fixed":
            if fixed_budget is not None:
                raise ValueError(f"fixed_budget is only used by schedule='fixed', not {self.schedule!r}")
            return None
        if isinstance(fixed_budget, bool) or not isinstance(fixed_budget, int):
            raise ValueError(f"schedule='fixed' needs an integer fixed_budget, got {fixed_budget!r}")
        if not self.min_budget <= fixed_budget <= self.num_filters:
            raise ValueError(
                f"fixed_budget {fixed_budget} is outside [min_budget, num_filters] = [{self.min_budget}, {self.num_filters}]"
            )
        return fixed_budget

    def __call__(self, step):
        if self.schedule == "fixed":
            return self.fixed_budget
        if step < self.warmup_steps or (self.full_every and (step + 1) % self.full_every == 0):
            return self.num_filters
        # A string seed is hashed with SHA-512: stable across processes, platforms and Python versions.
        rng = random.Random(f"essm-budget:{self.seed}:{step}")
        if self.per_layer:
            return tuple(self.draw(rng) for _ in range(self.num_layers))
        return self.draw(rng)

    def draw(self, rng):
        if self.schedule == "uniform":
            return rng.choice(self.grid)
        return self.snap_to_grid(self.paper_continuous_budget(rng.random()))

    def counted_budgets(self, step):
        """The budgets the budget counts record for `step`: one per layer with per-layer draws, else the step's."""
        budget = self(step)
        if isinstance(budget, tuple):
            return list(budget)
        return [budget] * (self.num_layers if self.per_layer else 1)

    def paper_continuous_budget(self, u):
        """Map ``u`` in [0, 1) to a budget in ``[min_budget, K]``, leaning as ``bias`` says."""
        biased = 1.0 - (1.0 - u) ** (1.0 / self.bias)
        return math.exp(math.log(self.min_budget) + biased * (math.log(self.num_filters) - math.log(self.min_budget)))

    def snap_to_grid(self, budget):
        """The nearest grid value; on a tie the smaller one (it comes first in the sorted grid)."""
        return min(self.grid, key=lambda k: abs(k - budget))

    def __repr__(self):
        settings = f"schedule={self.schedule!r}, num_filters={self.num_filters}, min_budget={self.min_budget}"
        if self.per_layer:
            settings += f", per_layer=True, num_layers={self.num_layers}"
        if self.schedule == "fixed":
            return f"{type(self).__name__}({settings}, fixed_budget={self.fixed_budget})"
        return (
            f"{type(self).__name__}({settings}, grid={list(self.grid)}, warmup_steps={self.warmup_steps}, "
            f"full_every={self.full_every}, seed={self.seed}, bias={self.bias:g})"
        )


def last_counted_step(log_history):
    """The global step of the last log that carries budget counts (0 for a fresh run)."""
    counted = [entry["step"] for entry in log_history if any(key.startswith("budget_count_") for key in entry)]
    return counted[-1] if counted else 0


def _inject_budget(budget, module, args, kwargs):
    # A budget passed explicitly by the caller wins over the step's draw.
    if kwargs.get("spectral_budget") is None:
        kwargs["spectral_budget"] = budget
    return args, kwargs


class BudgetSamplingCallback(TrainerCallback):
    """Runs every optimizer step of a ``Trainer`` at a budget drawn by a :class:`BudgetSampler`.

    The budget is drawn from ``(seed, state.global_step)`` in ``on_step_begin`` and passed to the model's
    forward through a forward pre-hook, so all micro-batches of a gradient-accumulation step and all DDP
    ranks use the same budget. The hook is removed in ``on_step_end``: evaluation runs at the model's default
    budget (``config.spectral_budget``, the full K unless set), or at whatever ``spectral_budget`` the
    evaluation code passes. The budget never touches ``model.config``
    (it would be saved with the checkpoint).

    The number of steps run at each budget since the previous log is added to the Trainer's logs (and
    ``state.log_history``) as ``budget_count_<k>`` entries; summed over the history they count every step
    of the run, across resumes. With per-layer draws they count layer-steps: each step once per layer.
    """

    def __init__(self, sampler=None):
        self.sampler = sampler
        self._active_sampler = sampler
        self._hook = None
        self._logged_through_step = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.config
        if self.sampler is None:
            self._active_sampler = BudgetSampler.from_config(config)
        elif self.sampler.num_filters != config.num_spectral_filters:
            raise ValueError(
                f"the budget sampler is built for K={self.sampler.num_filters} spectral filters "
                f"but the model has num_spectral_filters={config.num_spectral_filters}"
            )
        elif self.sampler.min_budget < config.min_spectral_budget:
            raise ValueError(
                f"the budget sampler's min_budget={self.sampler.min_budget} is below the model's "
                f"min_spectral_budget={config.min_spectral_budget}"
            )
        elif self.sampler.per_layer and self.sampler.num_layers != config.num_hidden_layers:
            raise ValueError(f"the budget sampler draws for num_layers={self.sampler.num_layers} layers but the "
                             f"model has num_hidden_layers={config.num_hidden_layers}")
        if self._active_sampler.per_layer and config.num_spectral_filters_per_layer is not None:
            raise ValueError("per-layer draws need the same K in every layer; this model was sliced per layer "
                             f"(num_spectral_filters_per_layer={config.num_spectral_filters_per_layer})")
        self._logged_through_step = last_counted_step(state.log_history)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        budget = self._active_sampler(state.global_step)
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(partial(_inject_budget, budget), with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._logged_through_step is None or state.global_step <= self._logged_through_step:
            return
        # Draws are a pure function of the step, so replaying them counts exactly the budgets that ran,
        # including steps taken before a resumed checkpoint but after its last log.
        steps = range(self._logged_through_step, state.global_step)
        counts = Counter(k for step in steps for k in self._active_sampler.counted_budgets(step))
        entries = {f"budget_count_{k}": n for k, n in sorted(counts.items())}
        self._logged_through_step = state.global_step
        # The Trainer appends a copy of `logs` to the history before calling back, so update both:
        # `logs` reaches the callbacks after this one (progress bar), the history is what is saved.
        logs.update(entries)
        state.log_history[-1].update(entries)

    def _remove_hook(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
