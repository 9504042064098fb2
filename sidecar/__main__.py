"""``python -m sidecar``: the ``rankside`` command line, for images and venvs without the script."""

import sys

from sidecar.cli.main import main

sys.exit(main())
