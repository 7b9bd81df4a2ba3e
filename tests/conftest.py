"""Test session set-up.

OpenMP threads wait passively: on a shared 2-core machine, spinning torch threads of one
process starve another's and a fit can run 20x slower (measured in benchmarks/pruning_quality).
Set before torch loads its OpenMP runtime; spawned DDP workers inherit it.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
