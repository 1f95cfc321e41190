"""``python -m queueformer.cli``: the same program as the ``queueformer`` command."""

import sys

from queueformer.cli import main

sys.exit(main())
