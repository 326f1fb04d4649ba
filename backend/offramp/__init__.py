"""Offramp: an early-exit LLM engine served through NVIDIA Triton Inference Server."""

from offramp.config import EngineConfig
from offramp.engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["EngineConfig", "SamplingParams", "__version__"]
