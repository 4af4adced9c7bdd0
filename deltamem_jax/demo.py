"""Forwarder kept for one release: ``python -m deltamem_jax.demo`` runs
:mod:`deltamem_jax.tools.demo`."""

from deltamem_jax.tools.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
