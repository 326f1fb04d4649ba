"""Contextual sparsity (R4, ShadowLLM): predict per decode token which query heads and FFN neuron
groups of every layer to compute, and compute only those (``docs/sparsity.md``)."""
