"""``python -m fastlora.bench [--suite ...] [--quick] [--out DIR]``: ``fastlora bench`` without the entry point."""

import sys

from fastlora.bench.cli import main

sys.exit(main())
