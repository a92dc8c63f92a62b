"""`python -m deepfleet_node.detect`, as the image's `detect` command runs it."""

import sys

from .cli import main

sys.exit(main())
