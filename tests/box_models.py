"""Tiny real models whose output only a known box of their input can change, and volumes to show them.

The vision side (DCFormer "nano", real mixer projector, transformers' Qwen2; or a MedMAP backbone)
is wrapped so that it multiplies its input by a mask that is 1 on ``MODEL_BOX`` only. In the
model's LPS axes (D, H, W) = (S, P, L), ``MODEL_BOX`` = the first half of each axis, which is the
inferior, anterior, right octant of whatever the model was shown.
"""

import dataclasses

import nibabel as nib
import numpy as np
import torch
from torch import nn
from transformers import Qwen2Config

from med3dvlm.detection import STUDY_KEY, Detector, detector_preprocess
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.models.medmap import MedMAPConfig, MedMAPModel
from med3dvlm.models.projector import ProjectorConfig
from med3dvlm.models.text import TextConfig
from med3dvlm.models.vlm import Med3DVLM, Med3DVLMConfig
from med3dvlm.pipeline import Pipeline
from med3dvlm.preprocess import PreprocessConfig
from med3dvlm.tokenizer import image_token_id, train_tokenizer
from med3dvlm.volume import Volume

INPUT = (16, 32, 32)
MODEL_BOX = (slice(0, 8), slice(0, 16), slice(0, 16))
REPORTS = ["The liver is enlarged with a hypodense lesion in segment seven.",
           "No focal lesion. The kidneys are normal in size and shape.",
           "A mass in the left kidney; no lymphadenopathy. Is there a cyst?"]
LABELS = (("liver", "cyst"), ("spleen", "mass"))
BODY = (slice(4, 44), slice(6, 38), slice(3, 21))  # voxels of body_volume() holding tissue


class BoxReader(nn.Module):
    """``inner`` applied to its input with everything outside ``MODEL_BOX`` zeroed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        mask = torch.zeros(INPUT)
        mask[MODEL_BOX] = 1.0
        self.register_buffer("mask", mask)

    @property
    def channels(self):  # MedMAP reads its backbone's channel widths
        return self.inner.channels

    def forward(self, x):
        return self.inner(x * self.mask)


def box_pipeline(detector: Detector | None = None) -> Pipeline:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(REPORTS * 3, vocab_size=320)
    vision = DCFormerConfig.preset("nano", INPUT)
    projector = ProjectorConfig.for_encoder(vision, 64, low_output_size=(8, 6), high_output_size=(4, 4))
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model = Med3DVLM(Med3DVLMConfig(text, vision, projector, image_token_id=image_token_id(tokenizer))).eval()
    model.vision_tower = BoxReader(model.vision_tower)
    pipe = Pipeline(model, tokenizer, detector=detector, name="box-reader")
    pipe.preprocess_config = PreprocessConfig(shape=INPUT)
    return pipe


def box_detector() -> Detector:
    torch.manual_seed(0)
    text = TextConfig("bert", dict(vocab_size=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=160), "mean")
    model = MedMAPModel(MedMAPConfig(LABELS, sequences=("T1", "T2"), input_size=INPUT, stem_channels=4,
                                     embed_dim=32, text=text))
    model.backbone = BoxReader(model.backbone)
    model.set_prompts(torch.zeros(len(LABELS), 4, dtype=torch.long), torch.ones(len(LABELS), 4, dtype=torch.long))
    model.freeze_text(True)
    return Detector(model, None, {STUDY_KEY: [0.5] * len(LABELS)}, detector_preprocess(INPUT))


def body_volume(modality: str = "CT", seed: int = 0) -> Volume:
    """A RAS volume: textured tissue in the box ``BODY`` of voxels, air (CT) or nothing (MR) around it."""
    rng = np.random.default_rng(seed)
    background, low, high = (-1000, -100, 200) if modality == "CT" else (0, 100, 400)
    array = np.full((48, 44, 24), background, np.int16)
    array[BODY] = rng.integers(low, high, [b.stop - b.start for b in BODY])
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-20.0, 10.0, -30.0)
    return Volume(array, affine, modality=modality, sequence="T2" if modality == "MR" else None)



def reoriented(volume: Volume, codes: str) -> Volume:
    """The same voxels in world space, stored with axes ``codes`` (e.g. "LPS", "PIR"), by nibabel."""
    image = nib.Nifti1Image(volume.array, volume.affine)
    now = nib.orientations.io_orientation(volume.affine)
    image = image.as_reoriented(nib.orientations.ornt_transform(now, nib.orientations.axcodes2ornt(codes)))
    return dataclasses.replace(volume, array=np.asarray(image.dataobj), affine=image.affine)


def centres(volume: Volume) -> np.ndarray:
    """RAS mm of every voxel centre, shaped (*volume.shape, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    return ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def octant(volume: Volume, seen: np.ndarray) -> np.ndarray:
    """The inferior, anterior, right octant (by voxel centres) of the voxels ``seen`` (a mask)."""
    xyz = centres(volume)
    half = np.abs(volume.affine[:3, :3]).sum(axis=1) / 2  # half a voxel along R, A, S
    low = xyz[seen].min(axis=0) - half
    high = xyz[seen].max(axis=0) + half
    middle = (low + high) / 2
    return seen & (xyz[..., 0] > middle[0]) & (xyz[..., 1] > middle[1]) & (xyz[..., 2] < middle[2])
