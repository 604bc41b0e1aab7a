"""``python -m rankalloc``: the ``rankalloc`` command, also under ``torchrun --nproc-per-node N -m rankalloc ...``."""

import sys

from rankalloc.studies.cli import main

if __name__ == "__main__":
    sys.exit(main())
