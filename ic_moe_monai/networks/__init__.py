"""Networks: IC-MoE and its parts, and the weights they load.

``ic_moe`` (the network), ``tiny_vit`` / ``sam_weights`` / ``medsam_lite_weights`` (encoders and their pretrained
weights), ``experts`` and ``voting`` (the mixture of experts), ``decoder_blocks`` / ``encoder_blocks`` / ``fusion`` /
``caching`` (building blocks), ``ensemble``, ``checkpoints`` (weights stamped with what they were trained for) and
``fine_tuning`` (loading a checkpoint trained for other labels).
"""

from ic_moe_monai.networks import checkpoints, fine_tuning
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
    "checkpoints",
    "count_parameters",
    "fine_tuning",
    "load_network_copy",
    "load_sam_checkpoint",
]
