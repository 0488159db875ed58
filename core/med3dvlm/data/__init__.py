"""Synthetic data with ground truth: CT/MRI phantoms, reports, questions, M3D dataset layouts."""

from .lesions import ABNORMALITIES, ALLOWED, LOCATIONS, ORGANS, Finding
from .m3d import CapItem, VQAItem, read_cap, read_vqa, write_dataset, write_samples
from .phantoms import (CT_PHASES, LABELS, GroundTruth, MRStudy, Phantom, make_ct_phantom,
                       make_mr_study)
from .questions import QUESTION_TYPES, closed_questions, open_questions
from .reports import mentioned_findings, write_report

__all__ = ["ABNORMALITIES", "ALLOWED", "CT_PHASES", "LABELS", "LOCATIONS", "ORGANS",
           "QUESTION_TYPES", "CapItem", "Finding", "GroundTruth", "MRStudy", "Phantom", "VQAItem",
           "closed_questions", "make_ct_phantom", "make_mr_study", "mentioned_findings",
           "open_questions", "read_cap", "read_vqa", "write_dataset", "write_report",
           "write_samples"]
