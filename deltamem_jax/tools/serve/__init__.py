"""An OpenAI-compatible HTTP server whose sessions keep their δ-mem state (``docs/serving.md``).

``cli`` parses and starts it, ``app`` has the routes, ``service`` what they do (keys,
sessions, turns, commits), ``protocol`` the wire format. The batching, scheduling and
durable storage it uses are library code in :mod:`deltamem_jax.inference`.
"""
