"""Reading pixels: slides (openslide), volumes (nibabel), arrays; dataset layouts; synthetic data."""

from hrvit.data.datasets import Case, CaseSpec, assign_splits, check_labels, check_min_size, discover, open_case
from hrvit.data.sources import (
    ArraySource,
    LabelSource,
    SlideSource,
    Source,
    TiffSource,
    VolumeSource,
    open_image,
    open_label,
    write_nifti,
)
from hrvit.data.synthetic import SLIDE_CLASSES, SyntheticSlide, make_slides, make_volumes
from hrvit.data.tiff import write_pyramid, write_pyramid_from_array

__all__ = [
    "ArraySource",
    "Case",
    "CaseSpec",
    "LabelSource",
    "SLIDE_CLASSES",
    "SlideSource",
    "Source",
    "SyntheticSlide",
    "TiffSource",
    "VolumeSource",
    "assign_splits",
    "check_labels",
    "check_min_size",
    "discover",
    "make_slides",
    "make_volumes",
    "open_case",
    "open_image",
    "open_label",
    "write_nifti",
    "write_pyramid",
    "write_pyramid_from_array",
]
