"""jaxtricks: training tricks for language models as pure Optax transforms and schedules.

The transforms (schedules, regularization, clipping, optimizer) import nothing of the model, the
data or the loop: ``import jaxtricks`` and use them with any optax optimizer.
"""

from jaxtricks.clipping import (
    ClipByGlobalNormState,
    ClipByValueState,
    SkipNonfiniteState,
    SkipSpikesState,
    ZClipState,
    clip_by_global_norm,
    clip_by_value,
    global_norm,
    skip_nonfinite,
    skip_spikes,
    zclip,
)
from jaxtricks.optimizer import (
    OPTIMIZER_NAMES,
    LearningRateState,
    make_optimizer,
    optimizer_stats,
    scale_by_learning_rate,
)
from jaxtricks.regularization import (
    L1RegularizationState,
    L2RegularizationState,
    WeightDecayState,
    decay_mask,
    l1_regularization,
    l2_regularization,
    weight_decay,
)
from jaxtricks.schedules import (
    DECAY_SHAPES,
    constant,
    cosine_decay,
    exponential_decay,
    inverse_sqrt,
    join_schedules,
    linear_warmup,
    polynomial_decay,
    warmup_stable_decay,
    warmup_then,
)

__all__ = [
    # schedules
    "DECAY_SHAPES",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "inverse_sqrt",
    "join_schedules",
    "linear_warmup",
    "polynomial_decay",
    "warmup_stable_decay",
    "warmup_then",
    # regularization
    "L1RegularizationState",
    "L2RegularizationState",
    "WeightDecayState",
    "decay_mask",
    "l1_regularization",
    "l2_regularization",
    "weight_decay",
    # clipping
    "ClipByGlobalNormState",
    "ClipByValueState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "ZClipState",
    "clip_by_global_norm",
    "clip_by_value",
    "global_norm",
    "skip_nonfinite",
    "skip_spikes",
    "zclip",
    # optimizer
    "OPTIMIZER_NAMES",
    "LearningRateState",
    "make_optimizer",
    "optimizer_stats",
    "scale_by_learning_rate",
]
