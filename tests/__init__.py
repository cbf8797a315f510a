"""medsight tests. A regular package, so `from tests.conftest import ...` finds this folder
even where a dependency installs a top-level `tests` package (iterative-stratification does)."""
