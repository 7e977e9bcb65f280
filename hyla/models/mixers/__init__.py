"""Token mixers [B, T, d] -> ([B, T, d], aux loss or None), one per layer-pattern letter."""

from hyla.models.mixers.attention import Attention
from hyla.models.mixers.deltanet import GatedDeltaNet
from hyla.models.mixers.linear import GLA, LinearAttention
from hyla.models.mixers.mom import MixtureOfMemories

MIXERS = {
    "L": LinearAttention,
    "G": GLA,
    "D": GatedDeltaNet,
    "M": MixtureOfMemories,
    "A": Attention,
}

__all__ = ["GLA", "MIXERS", "Attention", "GatedDeltaNet", "LinearAttention", "MixtureOfMemories"]
