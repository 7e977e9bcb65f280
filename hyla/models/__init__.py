"""Hybrid linear-attention language models."""

from hyla.models.config import ModelConfig
from hyla.models.generation import generate
from hyla.models.hybrid import HybridLM, LMOutput
from hyla.models.sequence import SequenceContext, SequenceStrategy, WholeSequence

__all__ = [
    "HybridLM",
    "LMOutput",
    "ModelConfig",
    "SequenceContext",
    "SequenceStrategy",
    "WholeSequence",
    "generate",
]
