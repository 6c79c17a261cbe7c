"""The simulated engine: a calibrated GPU cost model that executes plans in virtual time (the
simulator) or in real time (the worker's `sim` backend)."""
