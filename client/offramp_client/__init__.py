"""Python client for Offramp models served by Triton (HTTP generate endpoints and gRPC streams)."""

from offramp_client.client import Chunk, OfframpClient, Result

__all__ = ["Chunk", "OfframpClient", "Result"]
