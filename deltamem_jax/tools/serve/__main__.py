"""``python -m deltamem_jax.tools.serve``: see :mod:`deltamem_jax.tools.serve.cli`."""

import sys

from deltamem_jax.tools.serve.cli import main

sys.exit(main())
