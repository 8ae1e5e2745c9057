"""Models built from the dplr layers: :mod:`dplr.models.lm` (a small causal LM) and, with the
``hf`` extra, :mod:`dplr.models.hf` (its transformers wrapper)."""

from .lm import LM, MIXERS, PRESETS, KVCache, LMConfig, LMOutput, SoftmaxAttention, preset

__all__ = ["LM", "MIXERS", "PRESETS", "KVCache", "LMConfig", "LMOutput", "SoftmaxAttention", "preset"]
