"""Python client for Offramp models served by Triton (HTTP generate endpoints and gRPC streams)."""

from offramp_client.chat import ChatSession
from offramp_client.client import Chunk, OfframpClient, OfframpError, Result

__all__ = ["ChatSession", "Chunk", "OfframpClient", "OfframpError", "Result"]
