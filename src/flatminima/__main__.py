"""``python -m flatminima`` (also what ``torchrun -m flatminima`` runs)."""

import sys

from flatminima.cli import main

sys.exit(main())
