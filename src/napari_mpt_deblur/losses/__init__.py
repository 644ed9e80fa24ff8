"""Training losses: Haar DWT, EFCR / EFCRex contrastive regularisation, multi-scale L1."""

from .efcr import EFCRConfig, EFCRObjective, LossTerms, basic_cr, contrastive_ratio, extended_cr, random_reblur
from .haar import haar_dwt2, haar_idwt2, high, low_high
from .multiscale import multiscale_pixel_loss

__all__ = [
    "EFCRConfig",
    "EFCRObjective",
    "LossTerms",
    "basic_cr",
    "contrastive_ratio",
    "extended_cr",
    "haar_dwt2",
    "haar_idwt2",
    "high",
    "low_high",
    "multiscale_pixel_loss",
    "random_reblur",
]
