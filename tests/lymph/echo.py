"""`Echo`: the lymph 0.15 service the integration tests run as a real peer.

Started by the Rust test support (tests/src/lymph.rs) as

    PYTHONPATH=tests/lymph lymph instance --interface echo:Echo --config <dir>/.lymph.yml

so it registers in ZooKeeper as service `Echo` (the class name); `--interface echo:Bystander` runs the same methods
as service `Bystander`. Replies, by method:

| method                | reply                                                              |
|-----------------------|--------------------------------------------------------------------|
| `echo(text)`          | REP `text`                                                         |
| `upper(text)`         | REP `text.upper()`                                                 |
| `fail(message)`       | ERROR `{"type": "ValueError", "message": message}` (declared error) |
| `crash()`             | NACK (an undeclared exception)                                     |
| `sleep(seconds)`      | REP `seconds`, after a gevent sleep of that long                   |
"""

import gevent

import lymph


class Echo(lymph.Interface):
    @lymph.rpc()
    def echo(self, text):
        """Returns `text` unchanged."""
        return text

    @lymph.rpc()
    def upper(self, text):
        """Returns `text` in upper case."""
        return text.upper()

    @lymph.rpc(raises=(ValueError,))
    def fail(self, message):
        """Raises a declared ValueError(message): the caller gets an ERROR reply."""
        raise ValueError(message)

    @lymph.rpc()
    def crash(self):
        """Raises an undeclared error: lymph logs it and answers NACK."""
        raise RuntimeError("Echo.crash was called")

    @lymph.rpc()
    def sleep(self, seconds):
        """Sleeps `seconds` (without blocking other requests), then returns `seconds`."""
        gevent.sleep(seconds)
        return seconds


class Bystander(Echo):
    """`Echo`'s methods under another service name (the class name): a service that a fault on `Echo` must leave
    alone (the cluster tier runs it next to faulted `Echo` instances)."""
