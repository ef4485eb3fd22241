"""``python -m fastpc ...`` runs the ``fastpc`` command."""

import sys

from .cli import main

sys.exit(main())
