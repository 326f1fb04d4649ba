"""``python -m offramp_gateway`` runs the gateway (the same as ``offramp-openai``)."""

import sys

from offramp_gateway.cli import main

sys.exit(main())
