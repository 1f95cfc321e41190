"""``python -m queueformer.cli``: the same program as the ``queueformer`` command."""

import sys

from queueformer.cli import main

if __name__ == "__main__":  # the package walk of the import-boundary tests imports this module too
    sys.exit(main())
