"""How many tests of this process have failed so far.

Its own module: pytest imports ``conftest.py`` once as ``conftest`` (its hooks) and test files
import it again as ``tests.conftest`` (the Daemon class), so a counter kept there would be two.
"""

FAILED = [0]
