"""Networks: IC-MoE and its parts."""

from ic_moe_monai.networks.ensemble import AveragedPrediction, load_network_copy
from ic_moe_monai.networks.experts import AdaptiveExpert, BasicExpert, SemanticExpert
from ic_moe_monai.networks.ic_moe import DetailBranch, ICMoE, ICMoELayer, count_parameters
from ic_moe_monai.networks.sam_weights import SamCheckpointError, load_sam_checkpoint
from ic_moe_monai.networks.voting import TopKRouter

__all__ = [
    "AdaptiveExpert",
    "AveragedPrediction",
    "BasicExpert",
    "DetailBranch",
    "ICMoE",
    "ICMoELayer",
    "SamCheckpointError",
    "SemanticExpert",
    "TopKRouter",
    "count_parameters",
    "load_network_copy",
    "load_sam_checkpoint",
]
