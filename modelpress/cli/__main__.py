"""`python -m modelpress.cli`: the same as the `modelpress` command."""
import sys

from . import main

sys.exit(main())
