"""Verify the USMoE paper's claims about routing as a linear program on random score matrices.

The matrices come from *matrix families* (:data:`FAMILIES`, ``usmoe-lp families``), each a generator of
(T, N) score matrices that stresses one assumption of the theory (docs/definitions.md#three-kinds-of-family).

>>> from usmoe_lp.verify import VerifyConfig, run_verify
>>> res = run_verify(VerifyConfig(families=("gaussian",), sizes=((6, 3),), ks=(1,), trials=2,
...                               claims=("topc_optimal_eq",)), progress=False)
>>> [(c["claim"], c["verdict"]) for c in res.claim_summary()]
[('topc_optimal_eq', 'holds')]
"""

from usmoe_lp.verify.claims import CLAIMS, DEFAULT_BACKENDS, Batch, Check, Claim, Context, get_claims
from usmoe_lp.verify.families import FAMILIES, Family, get_families
from usmoe_lp.verify.runner import (
    Counterexample,
    TrialRecord,
    VerifyConfig,
    VerifyResult,
    run_verify,
    trial_seed,
)
from usmoe_lp.verify.shrink import Shrunk, shrink

__all__ = ["CLAIMS", "DEFAULT_BACKENDS", "FAMILIES", "Batch", "Check", "Claim", "Context", "Counterexample",
           "Family", "Shrunk", "TrialRecord", "VerifyConfig", "VerifyResult", "get_claims", "get_families",
           "run_verify", "shrink", "trial_seed"]
