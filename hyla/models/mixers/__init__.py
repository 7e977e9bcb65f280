"""Token mixers [B, T, d] -> ([B, T, d], aux loss or None), one per layer-pattern letter.

Each is called as mixer(x, seq, state, valid): a whole pass through the sequence context
`seq`, or (state given) a decoding step that continues its LayerState. valid [B, T] bool,
decoding only, is False at left padding: a padded token changes no state and no other
token's output."""

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
