"""Training: what ``python -m monai.bundle run training`` runs beyond MONAI's own engines.

``losses`` (Dice + CE and the IC-MoE terms), ``slice_sampling`` (2.5D slices from 3D volumes), ``trunk_cache`` (the
frozen encoder's features computed once and reused), ``clicks`` (simulated prompts), ``engines`` (trainer steps,
optimiser, schedule), ``handlers`` (validation, logging, time limits) and ``resume`` (checkpoints that resume).
"""

from ic_moe_monai.training.clicks import ClickPromptBatch, device_boxes, device_clicks, simulate_clicks
from ic_moe_monai.training.engines import (
    GraphedFunction,
    ICMoETrainer,
    WarmupCosineSchedule,
    adamw,
    capture_graph,
    decollate_without_sync,
)
from ic_moe_monai.training.handlers import (
    CaseMetricsWriter,
    LossTermsAverager,
    MLflowRunSettings,
    QualityCalibrationWriter,
    TrainingClock,
    TrainingSummary,
    TrainingTimeLimit,
    ValidationSchedule,
    iteration_log_filter,
    load_pretrained_weights,
)
from ic_moe_monai.training.losses import (
    ICMoELoss,
    expert_supervision_loss,
    load_balancing_loss,
    router_consistency_loss,
    router_consistency_target,
    semantic_contrastive_loss,
    token_labels,
)
from ic_moe_monai.training.resume import (
    INTERRUPTED_NAME,
    BestMetric,
    TrainingCheckpoints,
    checkpoint_files,
    latest_checkpoint,
)
from ic_moe_monai.training.slice_sampling import DeviceSliceLoader, SliceAugmentation, SliceBank, affine_warp
from ic_moe_monai.training.trunk_cache import TrunkCacheLoader, trunk_cached

__all__ = [
    "INTERRUPTED_NAME",
    "BestMetric",
    "CaseMetricsWriter",
    "ClickPromptBatch",
    "DeviceSliceLoader",
    "GraphedFunction",
    "ICMoELoss",
    "ICMoETrainer",
    "LossTermsAverager",
    "MLflowRunSettings",
    "QualityCalibrationWriter",
    "SliceAugmentation",
    "SliceBank",
    "TrainingCheckpoints",
    "TrainingClock",
    "TrainingSummary",
    "TrainingTimeLimit",
    "TrunkCacheLoader",
    "ValidationSchedule",
    "WarmupCosineSchedule",
    "adamw",
    "affine_warp",
    "capture_graph",
    "checkpoint_files",
    "decollate_without_sync",
    "device_boxes",
    "device_clicks",
    "expert_supervision_loss",
    "iteration_log_filter",
    "latest_checkpoint",
    "load_balancing_loss",
    "load_pretrained_weights",
    "router_consistency_loss",
    "router_consistency_target",
    "semantic_contrastive_loss",
    "simulate_clicks",
    "token_labels",
    "trunk_cached",
]
