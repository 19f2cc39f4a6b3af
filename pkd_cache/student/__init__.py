"""The student: initialisation from a pretrained model, the PKD losses and the layer maps."""
from .layer_map import layer_map
from .losses import LossWeights, hard_loss, patient_loss, pkd_loss, soft_loss

__all__ = ["layer_map", "LossWeights", "hard_loss", "patient_loss", "pkd_loss", "soft_loss"]
