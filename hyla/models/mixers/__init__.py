"""Token mixers [B, T, d] -> ([B, T, d], aux loss or None), one per layer-pattern letter.

Each is called as mixer(x, seq) and asks its `SequenceContext` `seq` for everything that
depends on where its tokens sit in the sequence, with one path for a whole pass (in one
process or split across ranks) and a decoding step (`hyla.models.decoding.DecodingContext`,
which continues the layer's state)."""

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
