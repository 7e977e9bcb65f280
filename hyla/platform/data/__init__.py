"""Training data, as torchtitan splits it: raw sources (`sources`) and their tokenizers,
token stores prepared once with Ray Data (`prepare`, `store`), samples packed from either
(`packing`), and each dp rank's loader over the run's sample stream (`loader`,
`hyla.platform.sampling`).

Every rank of a sequence-parallel group receives the same samples (they are split by dp rank
only) and keeps its own pieces of each sequence. From a token store a rank reads only the
tokens of its own samples.
"""

import importlib
from typing import Any

from hyla.platform.data.config import FORMATS, DataConfig
from hyla.platform.data.prepare import Progress, prepare, prepare_cached, source_listing
from hyla.platform.data.sources import (
    held_out,
    read_documents,
    source_files,
    stdlib_files,
    token_streams,
)
from hyla.platform.data.store import StorePart, TokenStore, is_store, read_manifest
from hyla.platform.data.tokenizers import (
    ByteTokenizer,
    JsonTokenizer,
    Tokenizer,
    fitting_tokenizer,
    load_tokenizer,
)

# The names that need torch, imported on first use: a Ray Data worker of `prepare` imports
# this package for its tokenizer and store writer only, and importing torch would add seconds
# to the start of every worker.
_LAZY = {
    "loader": (
        "build_dataset",
        "build_datasets",
        "build_loader",
        "check_data",
        "data_identity",
        "open_store",
    ),
    "packing": ("MQAR", "ArrayTokens", "Mixture", "PackedSequences", "SizedDataset", "TokenSource"),
}
_LAZY_MODULE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _LAZY_MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY_MODULE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "FORMATS",
    "MQAR",
    "ArrayTokens",
    "ByteTokenizer",
    "DataConfig",
    "JsonTokenizer",
    "Mixture",
    "PackedSequences",
    "Progress",
    "SizedDataset",
    "StorePart",
    "TokenSource",
    "TokenStore",
    "Tokenizer",
    "build_dataset",
    "build_datasets",
    "build_loader",
    "check_data",
    "data_identity",
    "fitting_tokenizer",
    "held_out",
    "is_store",
    "load_tokenizer",
    "open_store",
    "prepare",
    "prepare_cached",
    "read_documents",
    "read_manifest",
    "source_files",
    "source_listing",
    "stdlib_files",
    "token_streams",
]
