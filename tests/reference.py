"""An independent float64 NumPy reference of the δ-mem recurrence (SPEC §1), for tests."""

import numpy as np


def gates(beta, lam, mode):
    lam = 1.0 - beta if lam is None else lam
    if mode == "standard":
        return lam, beta, beta
    if mode == "lambda_outside":
        return lam, lam * beta, beta
    if mode == "no_lambda":
        return np.ones_like(beta), beta, beta
    raise ValueError(mode)


def recurrence(q, k, v, beta, lam=None, mask=None, s0=None, mode="standard"):
    """Token loop over rows of S; inputs [N, T, r] (gates [N, T, r] or [N, T, 1]).

    Returns reads [N, T, r] and final states [N, r, r], float64.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    N, T, r = q.shape
    beta = np.broadcast_to(np.asarray(beta, np.float64), (N, T, r))
    lam = None if lam is None else np.broadcast_to(np.asarray(lam, np.float64), (N, T, r))
    keep, erase, write = gates(beta, lam, mode)
    mask = np.ones((N, T), bool) if mask is None else np.broadcast_to(np.asarray(mask) != 0, (N, T))
    S = np.zeros((N, r, r)) if s0 is None else np.array(np.broadcast_to(s0, (N, r, r)), np.float64)
    reads = np.zeros((N, T, r))
    for n in range(N):
        for t in range(T):
            if not mask[n, t]:
                continue
            reads[n, t] = S[n] @ q[n, t]
            projected = S[n] @ k[n, t]
            S[n] = (keep[n, t][:, None] * S[n]
                    - erase[n, t][:, None] * np.outer(projected, k[n, t])
                    + write[n, t][:, None] * np.outer(v[n, t], k[n, t]))
    return reads, S
