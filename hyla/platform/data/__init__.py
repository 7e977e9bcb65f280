"""Training data, as torchtitan splits it: raw sources (`sources`) and their tokenizers,
token stores prepared once with Ray Data (`prepare`, `store`), samples packed from either
(`packing`), and each dp rank's loader over the run's sample stream (`loader`,
`hyla.platform.sampling`).

Every rank of a sequence-parallel group receives the same samples (they are split by dp rank
only) and keeps its own pieces of each sequence. From a token store a rank reads only the
tokens of its own samples.
"""

import warnings

from hyla.platform.data.config import FORMATS, DataConfig
from hyla.platform.data.loader import (
    build_dataset,
    build_datasets,
    build_loader,
    check_data,
    data_identity,
    open_store,
)
from hyla.platform.data.packing import (
    MQAR,
    ArrayTokens,
    Mixture,
    PackedSequences,
    SizedDataset,
    TokenSource,
)
from hyla.platform.data.prepare import prepare, prepare_cached, source_listing
from hyla.platform.data.sources import read_documents, source_files, stdlib_files, token_stream
from hyla.platform.data.store import TokenStore, is_store, read_manifest
from hyla.platform.data.tokenizers import (
    ByteTokenizer,
    JsonTokenizer,
    Tokenizer,
    fitting_tokenizer,
    load_tokenizer,
)

# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates: noise in every worker's
# output that nothing in hyla can change.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = [
    "FORMATS",
    "MQAR",
    "ArrayTokens",
    "ByteTokenizer",
    "DataConfig",
    "JsonTokenizer",
    "Mixture",
    "PackedSequences",
    "SizedDataset",
    "TokenSource",
    "TokenStore",
    "Tokenizer",
    "build_dataset",
    "build_datasets",
    "build_loader",
    "check_data",
    "data_identity",
    "fitting_tokenizer",
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
    "token_stream",
]
