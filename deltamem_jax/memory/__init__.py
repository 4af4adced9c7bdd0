"""The δ-mem core, bound by the paper and the parity fixtures.

``config`` (settings; no JAX), ``osam`` (the recurrence; pure JAX, no Flax) and
``layer`` (the NNX memory layer: projections, gates, corrections, token/span
writes). Nothing here knows about a backbone, data or training.
"""
