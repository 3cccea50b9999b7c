"""Drives the Python ``Scenario`` client (chaos-agent/python) from one host of the cluster tier (tests/src/cluster.rs).

Run as ``python cluster_scenario.py <lymph config> '<json request>'`` with ``chaos-agent/python/src`` on
``PYTHONPATH``; prints one JSON object on stdout. The request:

    {"zookeeper": "10.77.0.254:2181/chroot", "seed": 42, "dry_run": true, "timeout": 2,
     "actions": [{"method": "kill", "service": "Echo", "params": {"count": 2}}],   # applied once, if any
     "events": true}                                                                  # then Scenario.events()

or ``{"zookeeper": …, "runs": [{"seed": 1, "actions": …}, …]}`` for several scenarios in one interpreter (each run
is the request with the run's keys on top), answered as ``{"runs": [<answer>, …]}``.

The answer: ``reports`` (what ``apply()`` returned), ``error`` (what it raised: ``type``, ``message``, and for a
``PartialFailure`` its ``failures`` and ``reports``), ``events`` / ``events_error`` likewise for ``events()``.
"""

import json
import sys

from lymph_chaos import ChaosError, PartialFailure, Scenario


def describe(err):
    out = {"type": err.type, "message": str(err)}
    if isinstance(err, PartialFailure):
        out["failures"] = err.failures
        out["reports"] = err.reports
    return out


def main():
    request = json.loads(sys.argv[2])
    if "runs" in request:
        # Several scenarios in one interpreter (each run is a request of its own).
        print(json.dumps({"runs": [run(dict(request, **r)) for r in request.pop("runs")]}))
    else:
        print(json.dumps(run(request)))


def run(request):
    out = {}
    sn = Scenario(
        request["zookeeper"],
        seed=request.get("seed"),
        dry_run=request.get("dry_run", False),
        timeout=request.get("timeout", 2.0),
    )
    try:
        for action in request.get("actions", []):
            params = dict(action.get("params", {}))
            if action["method"] == "inject":
                sn.inject(action["service"], params.pop("kind"), **params)
            else:
                getattr(sn, action["method"])(action["service"], **params)
        if request.get("actions"):
            try:
                out["reports"] = sn.apply()
            except ChaosError as err:
                out["error"] = describe(err)
        if request.get("events"):
            try:
                out["events"] = sn.events()
            except ChaosError as err:
                out["events_error"] = describe(err)
        out["seed"] = sn.seed
    finally:
        sn.close()
    return out


if __name__ == "__main__":
    main()
