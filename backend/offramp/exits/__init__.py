"""Early exit: heads that turn an intermediate hidden state into logits, and the policies that decide."""

from offramp.exits.heads import ExitHead, IdentityHead, LowRankHead
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
