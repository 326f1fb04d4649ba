"""Early exit: heads that turn an intermediate hidden state into logits, and the policies that decide."""

from offramp.exits.policies import (
    ClassifierExit,
    ExitCheck,
    ExitDecision,
    ExitPolicy,
    GatedExit,
    NoExit,
    SimilarityExit,
    SoftmaxExit,
    make_policy,
)
from offramp.exits.heads import ExitHead, IdentityHead, LowRankHead

__all__ = [
    "ClassifierExit",
    "ExitCheck",
    "ExitDecision",
    "ExitHead",
    "ExitPolicy",
    "GatedExit",
    "IdentityHead",
    "LowRankHead",
    "NoExit",
    "SimilarityExit",
    "SoftmaxExit",
    "make_policy",
]
