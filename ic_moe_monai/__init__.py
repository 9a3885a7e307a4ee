"""IC-MoE: Segment Anything adapted to CT and MRI by a mixture of experts, as a MONAI bundle."""

__version__ = "0.1.0"
