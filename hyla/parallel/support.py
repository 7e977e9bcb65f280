"""Which sequence-parallel method supports what: the one place such checks live.

The config checks a job against it before anything starts, and the sequence-parallel
context checks again when a forward meets a feature (for code that builds its own
`SequenceParallel`). LASP-2 supports everything; the LASP-1 ring and Ulysses are baselines.
"""

from __future__ import annotations

SP_METHODS = ("lasp2", "lasp1", "ulysses")
FEATURES = ("zigzag", "mom", "documents")

UNSUPPORTED = {  # method -> feature -> why, and what to do instead
    "lasp1": {
        "zigzag": "a zigzag layout (the ring passes states in rank order); use "
        "parallel.sp_layout=contiguous or parallel.sp_method=lasp2",
    },
    "ulysses": {
        "zigzag": "a zigzag layout (it gathers whole sequences in rank order); use "
        "parallel.sp_layout=contiguous or parallel.sp_method=lasp2",
        "mom": "MoM layers (each memory's routed tokens differ per rank); use 'lasp2' or 'lasp1'",
        "documents": "document masking (doc_start); use 'lasp2' or 'lasp1'",
    },
}


def check_method(method: str) -> None:
    if method not in SP_METHODS:
        raise ValueError(f"parallel.sp_method must be one of {SP_METHODS}, got {method!r}")


def check_supports(method: str, feature: str) -> None:
    """ValueError if sequence-parallel `method` cannot run `feature` (one of FEATURES)."""
    check_method(method)
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    why = UNSUPPORTED.get(method, {}).get(feature)
    if why is not None:
        raise ValueError(f"parallel.sp_method={method!r} does not support {why}")


def check_heads(method: str, head_counts: list[int], sp: int) -> None:
    """Ulysses splits heads over the ranks: every head count must divide by sp."""
    if method == "ulysses" and any(h % sp for h in head_counts):
        raise ValueError(
            f"parallel.sp_method='ulysses' needs every head count to divide by the "
            f"sequence-parallel degree parallel.sp = {sp}, got head counts {head_counts}"
        )
