"""Benchmarks: ``python -m deltamem_jax.tools.bench <subcommand>`` (see ``__main__``)."""
