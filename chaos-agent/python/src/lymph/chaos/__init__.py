"""``lymph.chaos``: the 2015 import path of the lymph-chaos client (``from lymph.chaos import Scenario``).

Everything here is :mod:`lymph_chaos`. This distribution ships ``lymph/chaos/`` but no ``lymph/__init__.py``:
``lymph`` stays lymph's own (namespace) package when lymph is installed, and is an implicit namespace package
holding only ``chaos`` when it is not. Importing this module imports nothing from lymph.
"""

from lymph_chaos import *  # noqa: F403
from lymph_chaos import __all__, __version__  # noqa: F401
