"""masknet: paper-faithful MaskNet CTR ranking models (Wang, She, Zhang 2021)."""

__version__ = "0.1.0"
