"""The feature cache: run the frozen encoder once per (dataset, split, encoder, weights, transform, input size).

`prepare_features` is the entry point: it opens every split's cache, building, resuming or repairing it as needed
(`extract_features` is the same for one split with an encoder at hand). Inside: `cache` (the format on disk and its
verification), `extract` (the encode loop), `build` (plan / resume / repair / lock / DDP sharing).
"""

from .build import SOLO, ExtractionGroup, extract_features, prepare_features
from .cache import CacheDamagedError, CacheNotWritableError, FeatureCache, cache_key, source_fingerprint
from .extract import worker_context

__all__ = ["SOLO", "CacheDamagedError", "CacheNotWritableError", "ExtractionGroup", "FeatureCache", "cache_key",
           "extract_features", "prepare_features", "source_fingerprint", "worker_context"]
