"""``python -m dbn_kernels.benchmark`` is ``dbn-bench``."""

import sys

from .cli import main

sys.exit(main())
