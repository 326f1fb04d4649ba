"""Serving: the async engine, request parsing, detokenization, chat turns and the Triton adapter."""
