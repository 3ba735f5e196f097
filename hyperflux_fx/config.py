"""Every frozen configuration dataclass: GateConfig (insert_gates), FoldConfig (fold_masks), TrainConfig (train)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["CHANNEL_EPOCHS", "CONV_FLOOR", "LANGUAGE_MODEL_RECIPE", "WEIGHT_EPOCHS", "FoldConfig", "epoch_split",
           "language_model_lr", "GateConfig", "Granularity", "TrainConfig"]

Granularity = Literal["weight", "channel", "hybrid"]


@dataclass(frozen=True)
class GateConfig:
    """What ``insert_gates`` gates and how its gates start.

    The defaults follow the Hyperflux paper: every conv and linear weight is gated individually,
    flow parameters start in ``U(a, 2.5a)`` with ``a = 0.2`` and the straight-through gradient is
    scaled by ``kappa = 0.25``. For CNNs the first conv and the classifier are gated too; for
    ViT-like models (the graph contains attention) the patch embedding and the head stay dense.
    """

    granularity: Granularity = "weight"  # "weight", "channel" (groups: channels/heads/units) or "hybrid" (both)
    include: tuple[str, ...] = ("*",)  # fnmatch globs over qualified parameter names to consider
    exclude: tuple[str, ...] = ()  # globs removed after include (e.g. "head.*")
    min_numel: int = 0  # tensors with fewer elements stay dense
    gate_first: bool | None = None  # gate the first weight op(s); None = auto (paper's choice)
    gate_last: bool | None = None  # gate the op(s) producing the output; None = auto
    init_a: float = 0.2  # flow init U(a, 2.5a): all gates start open
    kappa: float = 0.25  # straight-through scale: dL/dt = kappa * dL/dm
    seed: int | None = None  # seed for flow init; None draws from torch's global RNG
    cost: str = "count"  # channel gates: pressure per unit scaled by "count" (1), "params" or "macs" per unit

    def __post_init__(self) -> None:
        if self.granularity not in ("weight", "channel", "hybrid"):
            raise ValueError(f"granularity must be 'weight', 'channel' or 'hybrid', got {self.granularity!r}")
        if self.init_a <= 0:
            raise ValueError(f"init_a must be > 0 so that every gate starts open, got {self.init_a}")
        if self.kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        if self.cost not in ("count", "params", "macs"):
            raise ValueError(f"cost must be 'count', 'params' or 'macs', got {self.cost!r}")
        if self.min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got {self.min_numel}")
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise TypeError(f"{field_name} takes a tuple of globs, e.g. ({value!r},), not a bare string")


@dataclass(frozen=True)
class FoldConfig:
    """How ``fold_masks`` compacts."""

    round_to: int | str = "auto"  # keep a conv's kept channel counts multiples of this (extra = strongest closed
    #   units); "auto" = ONNX Runtime's NCHWc block on this CPU (analysis.runtime.nchwc_block). On 2-D convs the
    #   blocked layout runs faster; on 1-D/3-D convs it is not faster (the narrowest conv is min_conv_channels')
    round_to_width: int | str = "auto"  # the same for linear/matmul widths (MLP units, the residual width);
    #   "auto" = 1 (ORT's GEMM is never faster for a multiple: tools/bench_rounding.py). Heads are never rounded
    min_channels: int = 1  # never delete a group down to fewer channels
    min_conv_channels: int | str = "auto"  # a conv's channel groups keep at least this many (all of a smaller
    #   group), before the rounding; "auto" = CONV_FLOOR (16) with round_to "auto", so that the narrowest conv a
    #   run can reach is the same on every CPU, and 1 with an explicit round_to (its multiple is then the floor,
    #   as it always was); halved with the block while a params/MACs target is out of reach (docs/folding.md)
    delete_dead: bool = True  # also delete channels whose weights and bias are all zero (weight masks alone)
    fold_batchnorm: bool = False  # merge inference BatchNorms into their convs (the result is for inference)

    def __post_init__(self) -> None:
        for name in ("round_to", "round_to_width"):
            value = getattr(self, name)
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"FoldConfig.{name} must be 'auto' or an int >= 1, got {value!r}")
        if self.min_channels < 1:
            raise ValueError(f"FoldConfig.min_channels must be >= 1, got {self.min_channels}")
        floor = self.min_conv_channels
        if floor != "auto" and not (isinstance(floor, int) and not isinstance(floor, bool) and floor >= 1):
            raise ValueError(f"FoldConfig.min_conv_channels must be 'auto' or an int >= 1, got {floor!r}")
        if floor == "auto" and self.round_to != "auto":  # an explicit multiple is its own floor, as before
            object.__setattr__(self, "min_conv_channels", 1)


# The narrowest conv layer FoldConfig(round_to="auto") lets a run reach, on every CPU: ONNX Runtime's NCHWc
# block where it is 16 (AVX-512), which the structured benchmarks' accuracies were measured with. Where the
# block is 8 (AVX2) a floor of one block let the MAC-weighted pressure squeeze MNIST-1D and digits convs to 8
# channels between wide ones (docs/BENCHMARKS.md, "On a CPU without AVX-512").
CONV_FLOOR = 16
TARGET_MEASURES = ("count", "params", "macs", "latency")
PRESSURE_MODES = ("auto", "coupled", "decoupled")
DISTILL_MODES = ("auto", "on", "off")
# Distillation defaults, chosen on a validation split carved from the training data (docs/training.md).
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 4.0
# With weight gates only, the regrowth phase starts its weight LR at lr * this (lr 0.1 -> 0.03). The paper's
# 1e-3 follows 100 pruning epochs with 60 of regrowth; in the CLI's 10 + 5 it leaves too little to recover
# (docs/training.md; the figures in docs/BENCHMARKS.md, "Measurements behind the design").
REGROWTH_LR_RATIO = 0.3
# With channel gates the regrowth phase fine-tunes a landed structure, and it restarts at the full LR: LR
# rewinding (Renda et al. 2020), which beats a fine-tune at a small LR after structured pruning (Le & Hua
# 2021). Measured against 0.3 over six seeds per cell (docs/BENCHMARKS.md, "The fine-tune restarts at the
# full LR").
CHANNEL_REGROWTH_LR_RATIO = 1.0
# The epoch budget's split, (pruning, regrowth), when TrainConfig.epochs / regrowth_epochs are None. With channel
# gates the pruning phase finds the structure and the regrowth phase fine-tunes it after the landing, so the
# fine-tune gets two thirds: against 10 + 5, nine seeds on the four benchmark CNNs at 2x / 4x / 16x fewer MACs,
# +0.06 +- 0.04 pt, a lower test loss in 10 of 12 cells on the development seeds, +0.09 on the held-out ones
# (docs/BENCHMARKS.md, "A 5 + 10 split"). Weight gates only keep the paper's proportions (100 + 60 at CIFAR
# scale; its regrowth phase keeps the flows free until mid-regrowth), which bench_sparsity measures.
CHANNEL_EPOCHS = (5, 10)
WEIGHT_EPOCHS = (10, 5)


def epoch_split(structured: bool) -> tuple[int, int]:
    """The default (pruning, regrowth) epochs: :data:`CHANNEL_EPOCHS` with channel gates (``structured``),
    :data:`WEIGHT_EPOCHS` with weight gates only."""
    return CHANNEL_EPOCHS if structured else WEIGHT_EPOCHS


OPTIMIZERS = ("sgd", "adamw")
FLUX_NORMALIZATIONS = ("element", "shared")
# The language-model recipe (docs/frontends.md, with its sources and the measurement behind the LR): AdamW
# (betas 0.9/0.95, weight decay 0.1, as LLaMA was trained), linear warm-up over the first 3% of the steps,
# cosine to 10% of the peak, gradient norms clipped at 1.0, no label smoothing; the peak LR follows the
# width (language_model_lr). The flows keep their own Adam. The fine-tune after pruning restarts at the peak
# LR (a pruned language model recovers as a fine-tune from one-shot pruning does), and the channel gates'
# pressure is the same on every unit whatever it saves (the controller still lands on the measure asked):
# weighted by the cost, or its square root, it closed half the query and KV heads and did worse. A twelfth
# of the budget prunes and the rest recovers (0.25 + 2.75 epochs: the pruned model is fine-tuned for
# longest, as Sheared-LLaMA and Minitron spend most of their tokens after pruning). The distillation's
# temperature is 1 (per token, the teacher's own distribution; the CNNs' 4 pulls a half-size student toward
# a teacher it can beat); docs/BENCHMARKS.md, "Against Torch-Pruning's Llama recipe", has each measured.
LANGUAGE_MODEL_RECIPE: dict[str, object] = {
    "optimizer": "adamw", "lr": 1e-4, "lr_final_ratio": 0.1, "weight_decay": 0.1, "betas": (0.9, 0.95),
    "warmup_fraction": 0.03, "clip_grad_norm": 1.0, "regrowth_lr_final": 1e-5, "label_smoothing": 0.0,
    "regrowth_lr_ratio": 1.0, "cost_exponent": 0.0, "epochs": 0.25, "regrowth_epochs": 2.75,
    "flow_warmup_steps": 3, "distill_temperature": 1.0,
}
LM_LR_ANCHOR = (256, 1e-3)  # (width, peak LR) measured best on a pre-trained 4-layer Llama (docs/BENCHMARKS.md)
LM_LR_RANGE = (5e-5, 1e-3)


def language_model_lr(hidden_size: int | None) -> float:
    """The recipe's peak LR for a model of this width: the anchor scaled as 1/width, AdamW's rule for
    hidden layers under muP (Yang et al. 2022), within LM_LR_RANGE: 1e-3 at 256, 2.5e-4 at 1024, 6e-5
    at 4096 (Sheared-LLaMA's and Minitron's continued training use 1e-4 there). Unknown width: 1e-4."""
    if not hidden_size:
        return float(LANGUAGE_MODEL_RECIPE["lr"])  # type: ignore[arg-type]
    width, lr = LM_LR_ANCHOR
    return min(LM_LR_RANGE[1], max(LM_LR_RANGE[0], lr * width / hidden_size))


@dataclass(frozen=True)
class TrainConfig:
    """The Hyperflux training schedule (HYPERFLUX.md §4-§6) and how to run it.

    Defaults follow the paper's CIFAR recipe where it has one. Where the paper assumes 100+ epochs,
    the short-run rules are stated per field (``flow_lr``, ``interval_steps``).
    """

    target_sparsity: float = 0.9  # final fraction of gated units removed, in (0, 1)
    epochs: float | None = None  # pruning-phase epochs; a fraction is allowed (0.5: half a pass over the loader);
    #   None: 5 with channel gates, 10 with weight gates only (CHANNEL_EPOCHS / WEIGHT_EPOCHS)
    regrowth_epochs: float | None = None  # regrowth-phase epochs (gamma = 0); a fraction is allowed; None: 10 with
    #   channel gates, 5 with weight gates only
    lr: float = 0.1  # weight LR at the start of pruning, cosine-decayed to lr * lr_final_ratio
    lr_final_ratio: float = 1 / 30  # end of the pruning phase's cosine, relative to lr
    optimizer: str = "sgd"  # the weights' optimiser: "sgd" (the paper's) or "adamw" (LANGUAGE_MODEL_RECIPE)
    momentum: float = 0.9  # SGD momentum on the weights
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's betas
    weight_decay: float = 5e-4  # on conv/linear weights only (none on norms, biases, flows)
    warmup_fraction: float = 0.0  # the weight LR rises linearly from 0 over this fraction of the pruning steps
    clip_grad_norm: float | None = None  # clip the weights' gradient norm to this (None: never)
    flow_lr: float | None = None  # Adam LR of the flow parameters; None = 1e-3, raised for short runs
    flow_travel: float = 5.0  # short-run rule: flow_lr >= flow_travel / pruning steps (paper: ~39)
    flow_warmup_steps: int = 0  # the flow LR rises linearly over the first N pruning steps (k/N of it at step k):
    #   Adam's first steps move every flow by its full LR whatever its gradient, so with a short run's large
    #   flow LR one batch's flux sign would close units; 0: none (the paper's)
    regrowth_lr: float | None = None  # weight LR at the start of regrowth, cosine-decayed to regrowth_lr_final;
    #   None: lr * regrowth_lr_ratio; the paper's is 1e-3 (pass it to reproduce the paper)
    regrowth_lr_ratio: float | None = None  # regrowth_lr = lr * this when regrowth_lr is None; None:
    #   CHANNEL_REGROWTH_LR_RATIO (1) with channel gates, REGROWTH_LR_RATIO (0.3) with weight gates only
    regrowth_lr_final: float = 1e-4
    regrowth_flow_scaler: float = 1.0  # flow LR at regrowth start = flow_lr * scaler (paper: 1..5)
    regrowth_decay: float = 0.75  # flow LR multiplied by decay**k in regrowth epoch k (0.55 ImageNet)
    regrowth_flow_epochs: int = 50  # flow LR is 0 from this regrowth epoch on
    target_measure: str = "count"  # "count": fraction of gated units; "params" / "macs": fraction of the
    #   whole model's parameters / MACs removed, exactly as fold_masks(fold) + count_params_and_macs give them
    #   "latency": of the compact model's predicted ONNX Runtime CPU latency (analysis/latency_model.py)
    fold: FoldConfig = field(default_factory=FoldConfig)  # the fold the exact measures count (pass it to fold_masks)
    latency_dense_ms: float | None = None  # "latency": the whole dense model's measured ms at the example batch
    latency_cache: str | None = None  # "latency": the op-timing cache directory (None: $HYPERFLUX_CACHE or ~/.cache)
    uniform_layers: bool = False  # the landing gives every numbered layer the same kept counts (heads, KV heads,
    #   MLP units: the groups alike at the same place of ``...layers.N...``), as Minitron and Sheared-LLaMA keep a
    #   Hugging Face config valid; each layer keeps its own strongest units. Needs an exact target measure
    land: bool = True  # at land_at of regrowth: shift all flows by one constant to hit the target, freeze them
    land_at: float | None = None  # fraction of the regrowth phase after which the landing happens; None: 0.5
    #   with weight gates only, 0.0 (the end of pruning) with channel gates (docs/training.md)
    label_smoothing: float = 0.1  # for the default classification loss
    distill: str = "auto"  # distil from the dense model the run starts from (the teacher), during pruning and
    #   regrowth: loss = (1 - alpha) * task + alpha * T^2 * KL(teacher_T || student_T), per class vector (per token
    #   for language models). "auto": on with channel gates (a structure to recover) when the outputs are class
    #   logits and the targets class indices, off with weight gates only (the paper's recipe); "on": with any
    #   gates, an error when the outputs are not class logits; "off": the task loss alone
    distill_alpha: float = DISTILL_ALPHA  # weight of the distillation term (docs/training.md: how it was chosen)
    distill_temperature: float = DISTILL_TEMPERATURE  # softmax temperature T of teacher and student
    cost_exponent: float = 1.0  # channel gates under a params/MACs/latency target: each group's pressure scales
    #   with (what one of its units saves)**cost_exponent over the mean; 1 = the cost itself, 0 = every unit alike
    cost_basis: str = "current"  # where a unit's saving is evaluated: "current" (every group at its open units now)
    #   or "uniform" (every gated group at the same fraction of its units, the run's open fraction now: a group's
    #   pressure then does not grow because its neighbours stayed wide)
    pressure_step: float = 0.2  # controller step s (0.15 ImageNet)
    regrowth_compensation: float = 11.5 / 13  # pruning phase aims at final remaining * this
    interval_steps: int | None = None  # scheduler interval in steps; None = 1 epoch, or pruning/20 if shorter
    min_intervals: int = 20  # the automatic interval keeps at least this many in the pruning phase
    warmup_intervals: int = 1  # gamma = 0 during the first interval(s)
    controller_lookahead: int | None = None  # judge the density extrapolated L intervals ahead; None = the
    #   flows' response lag in intervals (scheduler.response_lag_intervals); 0 = the paper's controller
    controller_scale_down: bool = True  # ahead of plan: scale g by judged/planned first (False = the paper's)
    pressure: str = "auto"  # "coupled": gamma/N added to the flows' gradient, through Adam (the paper's);
    #   "decoupled": after Adam's step every flow moves down by flow_lr * gamma * its pressure scale (as AdamW
    #   decouples weight decay), so gamma acts in proportion; "auto": decoupled with channel gates, else coupled
    flux_normalization: str = "element"  # how the flows' Adam normalises the flux of channel gates: "element" (one
    #   second moment per unit, the paper's Adam) or "shared" (one for all channel units, the mean square of
    #   their flux: the flux's magnitude then counts against the decoupled pressure, not only its consistency;
    #   measured on 12 cells, not better: docs/BENCHMARKS.md). Weight gates' flows are always per element
    controller_floor: float | None = 0.0  # decoupled pressure: a step's new closings that would take the kept
    #   fraction below the plan at the interval's end, less this share, wait (their flows held at 0); None: off
    controller_max_close: float | None = 0.08  # decoupled pressure: at most this fraction of the channel units
    #   closes per interval; later closings wait (their flows held at 0) for the next interval. None: off
    controller_max_flip: float | None = 0.10  # decoupled pressure: at most this fraction of the channel units
    #   differs from the interval's start (closed or regrown); a step's further changes wait, the least decided
    #   first (a closing held open at 0, a regrowth held closed just below 0). None: off
    regrowth_lift: float | None = None  # decoupled pressure: a unit that regrows during pruning has its flow
    #   lifted to at least this, so it is not probed again at once; None = the mean open flow at the start; 0: off
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    amp: str = "auto"  # "auto" (bf16 if supported else fp16 on CUDA; off on CPU), "bf16", "fp16", "off"
    compile: bool = False  # torch.compile the gated model
    seed: int = 0  # seeds torch/python/numpy and the data order
    out_dir: str | None = None  # checkpoints/ and metrics.jsonl go here (rank 0 only); None = nothing written
    resume: bool = False  # continue from out_dir/checkpoints/last.pt when it exists
    track_flux: bool = True  # accumulate flux for the recorder (one extra pass per gated tensor per step)
    eval_every: int = 1  # validation every N intervals (and always at the end of each phase)
    progress: bool = False  # tqdm progress bars
    max_intervals: int | None = None  # stop (resumably) after this many intervals in this call

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sparsity < 1.0:
            raise ValueError(f"TrainConfig.target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:  # NaN fails too
            raise ValueError(f"TrainConfig.epochs must be > 0 and finite, got {self.epochs}")
        if self.regrowth_epochs is not None and not 0 <= self.regrowth_epochs < math.inf:
            raise ValueError(f"TrainConfig.regrowth_epochs must be >= 0 and finite, got {self.regrowth_epochs}")
        for name in ("lr", "regrowth_lr", "regrowth_lr_final", "regrowth_lr_ratio", "pressure_step", "flow_travel"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.controller_lookahead is not None and self.controller_lookahead < 0:
            raise ValueError(f"TrainConfig.controller_lookahead must be >= 0 or None, got {self.controller_lookahead}")
        if isinstance(self.flow_warmup_steps, bool) or not isinstance(self.flow_warmup_steps, int) or (
                self.flow_warmup_steps < 0):
            raise ValueError(f"TrainConfig.flow_warmup_steps must be an int >= 0, got {self.flow_warmup_steps!r}")
        if self.flow_lr is not None and not self.flow_lr > 0:
            raise ValueError(f"TrainConfig.flow_lr must be > 0 or None, got {self.flow_lr}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"TrainConfig.amp must be 'auto', 'bf16', 'fp16' or 'off', got {self.amp!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.land_at is not None and not 0.0 <= self.land_at <= 1.0:
            raise ValueError(f"TrainConfig.land_at must be in [0, 1], got {self.land_at}")
        if self.target_measure not in TARGET_MEASURES:
            raise ValueError(f"TrainConfig.target_measure must be one of {TARGET_MEASURES}, "
                             f"got {self.target_measure!r}")
        if self.controller_floor is not None and not 0.0 <= self.controller_floor < 1.0:
            raise ValueError(f"TrainConfig.controller_floor must be in [0, 1) or None, got {self.controller_floor}")
        if self.controller_max_close is not None and not 0.0 < self.controller_max_close <= 1.0:
            raise ValueError(f"TrainConfig.controller_max_close must be in (0, 1] or None, "
                             f"got {self.controller_max_close}")
        if self.controller_max_flip is not None and not 0.0 < self.controller_max_flip <= 1.0:
            raise ValueError(f"TrainConfig.controller_max_flip must be in (0, 1] or None, "
                             f"got {self.controller_max_flip}")
        if self.regrowth_lift is not None and self.regrowth_lift < 0:
            raise ValueError(f"TrainConfig.regrowth_lift must be >= 0 or None, got {self.regrowth_lift}")
        if self.uniform_layers and self.target_measure not in ("params", "macs", "latency"):
            raise ValueError("TrainConfig.uniform_layers needs target_measure 'params', 'macs' or 'latency' "
                             f"(the landing balances the layers' counts on it), got {self.target_measure!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"TrainConfig.clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"TrainConfig.distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"TrainConfig.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise ValueError(f"TrainConfig.distill_temperature must be > 0, got {self.distill_temperature}")
        if self.cost_basis not in ("current", "uniform"):
            raise ValueError(f"TrainConfig.cost_basis must be 'current' or 'uniform', got {self.cost_basis!r}")
        if not 0.0 <= self.cost_exponent <= 1.0:
            raise ValueError(f"TrainConfig.cost_exponent must be in [0, 1], got {self.cost_exponent}")
        if self.pressure not in PRESSURE_MODES:
            raise ValueError(f"TrainConfig.pressure must be one of {PRESSURE_MODES}, got {self.pressure!r}")
        if self.flux_normalization not in FLUX_NORMALIZATIONS:
            raise ValueError(f"TrainConfig.flux_normalization must be one of {FLUX_NORMALIZATIONS}, "
                             f"got {self.flux_normalization!r}")
        if self.resume and self.out_dir is None:
            raise ValueError("TrainConfig.resume needs out_dir (where the checkpoints are)")

    @classmethod
    def for_language_models(cls, hidden_size: int | None = None, **changes: object) -> TrainConfig:
        """A config with :data:`LANGUAGE_MODEL_RECIPE` (AdamW, warm-up, cosine, clipping) and the peak LR of
        :func:`language_model_lr` for ``hidden_size``, ``changes`` on top."""
        recipe = {**LANGUAGE_MODEL_RECIPE, "lr": language_model_lr(hidden_size)}
        return cls(**{**recipe, **changes})  # type: ignore[arg-type]

    def resolved(self, structured: bool) -> TrainConfig:
        """This config with the defaults that depend on the gates filled in. With channel gates
        (``structured``) the masks are a structure, not a sparsity pattern that can regrow: the landing
        happens at the end of pruning and the regrowth phase fine-tunes the landed structure. With weight
        gates only the landing happens halfway through regrowth, as the paper's regrowth intends. Either
        way the regrowth phase starts from ``lr * regrowth_lr_ratio``, which is 1 with channel gates (the
        landed structure is fine-tuned from the full LR) and 0.3 with weight gates only. Epochs left None
        split the budget as :data:`CHANNEL_EPOCHS` (5 + 10: the fine-tune gets most of it) or
        :data:`WEIGHT_EPOCHS` (10 + 5)."""
        split = epoch_split(structured)
        epochs = self.epochs if self.epochs is not None else split[0]
        regrowth_epochs = self.regrowth_epochs if self.regrowth_epochs is not None else split[1]
        land_at = self.land_at if self.land_at is not None else (0.0 if structured else 0.5)
        ratio = self.regrowth_lr_ratio
        if ratio is None:
            ratio = CHANNEL_REGROWTH_LR_RATIO if structured else REGROWTH_LR_RATIO
        regrowth_lr = self.regrowth_lr if self.regrowth_lr is not None else self.lr * ratio
        pressure = self.pressure if self.pressure != "auto" else ("decoupled" if structured else "coupled")
        distill = "off" if (self.distill == "auto" and (not structured or self.distill_alpha == 0.0)) else self.distill
        return replace(self, epochs=epochs, regrowth_epochs=regrowth_epochs, land_at=land_at, regrowth_lr=regrowth_lr,
                       regrowth_lr_ratio=ratio, pressure=pressure, distill=distill)
