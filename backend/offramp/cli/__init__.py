"""The ``offramp`` command line."""
