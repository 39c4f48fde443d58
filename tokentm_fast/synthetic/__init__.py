"""Synthetic localization benchmark: generator, shipped model, training command.

See :mod:`tokentm_fast.synthetic.shapes` for the data design,
:mod:`tokentm_fast.synthetic.model` for the shipped ViT and
:mod:`tokentm_fast.synthetic.train` (``python -m tokentm_fast.synthetic.train``)
for the command that reproduces its weights.
"""
from .shapes import (
    CLASS_NAMES,
    DISTRACTOR_NAMES,
    EXTRA_SHAPES,
    IMAGE_SIZE,
    MEAN,
    SPLIT_IDS,
    STD,
    SyntheticShapes,
    generate,
    generate_arrays,
    generate_uint8,
    rasterize,
    render,
    sample_params,
    save_folder,
)

__all__ = [
    "CLASS_NAMES",
    "DISTRACTOR_NAMES",
    "EXTRA_SHAPES",
    "IMAGE_SIZE",
    "MEAN",
    "SPLIT_IDS",
    "STD",
    "SyntheticShapes",
    "generate",
    "generate_arrays",
    "generate_uint8",
    "rasterize",
    "render",
    "sample_params",
    "save_folder",
    "create_synthetic_vit",
    "synthetic_data_config",
    "load_metadata",
    "SYNTHETIC_VIT_CONFIG",
    "WEIGHTS_PATH",
    "METADATA_PATH",
]


def __getattr__(name):  # lazy: importing the generator does not import timm
    if name in ("create_synthetic_vit", "synthetic_data_config", "load_metadata",
                "SYNTHETIC_VIT_CONFIG", "WEIGHTS_PATH", "METADATA_PATH"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
