"""IC-MoE: Segment Anything adapted to CT and MRI by a mixture of experts, as a MONAI bundle."""

from ic_moe_monai import data, evaluation, handlers, inferers, losses, networks, transforms

__version__ = "0.1.0"

__all__ = ["__version__", "data", "evaluation", "handlers", "inferers", "losses", "networks", "transforms"]
