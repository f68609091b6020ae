# A package, so that its conftest imports as `faults.conftest` and never shadows tests/conftest.py
# (which the fault tests import as `conftest`, like every other test module).
