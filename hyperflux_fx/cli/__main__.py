"""``python -m hyperflux_fx.cli`` (and ``torchrun -m hyperflux_fx.cli``): the hyperflux-compile command."""

import sys

from hyperflux_fx.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
