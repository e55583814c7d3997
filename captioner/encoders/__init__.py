"""Frozen pretrained image encoders, split as open_clip splits them: `spec` (what determines the output),
`weights` (where the weights come from), `transforms` (image -> input tensor) and `adapter` (the frozen trunk)."""

from .adapter import FrozenEncoder
from .spec import EncoderSpec, EncoderWeightsError, file_sha256, known_encoders, relocate_weights
from .transforms import NormaliseBatch, build_transform, spec_transform, split_transform, transform_signature
from .weights import create_trunk, rename_efficientnet_pytorch_keys

__all__ = ["EncoderSpec", "EncoderWeightsError", "FrozenEncoder", "NormaliseBatch", "build_transform",
           "create_trunk", "file_sha256", "known_encoders", "relocate_weights", "rename_efficientnet_pytorch_keys",
           "spec_transform", "split_transform", "transform_signature"]
