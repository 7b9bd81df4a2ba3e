"""Benchmarks of lichtenberg: overhead and quality measured side by side with Lightning's peers."""

import gc
import sys

__all__: list[str] = []

# A smoke run (`python -m benchmarks.NAME --quick`, and the ranks it spawns, which inherit its argv) imports
# torch and Lightning with the cyclic garbage collector off: on, it re-traverses the growing heap dozens of
# times during those imports (~1 s of each process's start). harness.start (FreezeGC in a spawned rank)
# freezes what the imports made and turns the collector back on. A full run is untouched.
if "--quick" in sys.argv[1:]:
    gc.disable()
