"""mnq-search: integer-only Vision Transformers with a per-layer search over non-linear methods.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it (and
only if torch is not loaded yet): the fast kernels (:mod:`mnq_search.integer`) run between
torch's OpenMP regions on the same cores, and OpenMP workers that spin after each region took
those cores from them (measured: quantized evaluation 0.56x -> 0.67x of float on 2 cores, the
float model unchanged).
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
