"""The demo's `Echo`: the test suite's Echo (tests/lymph/echo.py) plus `whoami`, so the demo's client can show
which process answered each call. It registers as service `Echo` (the class name).

Started by `cargo xtask demo` (xtask/src/demo.rs) under a restart loop as

    PYTHONPATH=tests/demo:tests/lymph lymph instance --interface demo_echo:Echo --config <run dir>/.lymph.yml
"""

import os

import lymph
from echo import Echo as TestEcho


class Echo(TestEcho):
    @lymph.rpc()
    def whoami(self, text):
        """Returns `text` in upper case and the pid of the process that answered."""
        return {"text": text.upper(), "pid": os.getpid()}
