"""``python -m pyllama.server MODEL [options]``: the same as ``pyllama serve``."""

import sys

from ..cli import serve_main

sys.exit(serve_main(sys.argv[1:], prog="python -m pyllama.server"))
