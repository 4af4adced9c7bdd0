"""Command-line tools (demo, chat, capacity study, parity, benchmarks, serving).

The library never imports this package; each tool is ``python -m deltamem_jax.tools.<name>``.
"""
