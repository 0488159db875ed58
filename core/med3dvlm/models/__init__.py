"""Model components: DCFormer encoder, MLP-Mixer projector, SigLIP towers and loss, text tower."""

from med3dvlm.models.dcformer import DCFormer, DCFormerConfig, stage_tokens
from med3dvlm.models.projector import MixerProjector, ProjectorConfig
from med3dvlm.models.siglip import SigLIPModel, pairwise_sigmoid_terms, sigmoid_loss
from med3dvlm.models.text import TextConfig, build_text_model, encode_text_tokens

__all__ = [
    "DCFormer",
    "DCFormerConfig",
    "MixerProjector",
    "ProjectorConfig",
    "SigLIPModel",
    "TextConfig",
    "build_text_model",
    "encode_text_tokens",
    "pairwise_sigmoid_terms",
    "sigmoid_loss",
    "stage_tokens",
]
