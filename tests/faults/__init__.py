# A package, so that its conftest imports as `faults.conftest` and never shadows tests/conftest.py.
