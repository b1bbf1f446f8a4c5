"""``python -m fastlora`` is the ``fastlora`` command."""

import sys

from fastlora.cli import main

sys.exit(main())
