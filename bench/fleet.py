"""Simulated fleet: 10,000 units on their own MQTT connections, beside the same fleet on 4 shared ones.

Each run happens in a fresh process against a private Mosquitto and reports the time to open the
connections, the process's peak memory, and the publish rate of a clean backfill.

    .venv/bin/python -m bench.fleet --units 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import Mosquitto


def one(port: int, units: int, connections: str) -> dict[str, float]:
    from simulators.publisher import Endpoint
    from simulators.run import RunOptions, simulate
    from simulators.scenario import Faults

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opts = RunOptions(
        units=units,
        customers=20,
        days=0.0625,
        speed=0,
        connections=None if connections == "per-unit" else int(connections),
        faults=Faults.clean(),
        end=time.time(),
    )
    summary = asyncio.run(simulate(opts, Endpoint((("127.0.0.1", port),)), open("/dev/null", "w")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "connect_s": summary.connect_seconds,
        "sent": summary.sent,
        "seconds": summary.seconds,
        "base_mb": base / 1024,
        "peak_mb": peak / 1024,
        "connections": summary.connections,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--child", nargs=2, metavar=("PORT", "CONNECTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(int(args.child[0]), args.units, args.child[1])))
        return
    with tempfile.TemporaryDirectory(prefix="smame-fleet-") as tmp:
        mq = Mosquitto(Path(tmp) / "mq")
        try:
            runs = {}
            for mode in ("4", "per-unit"):
                out = subprocess.run(
                    [sys.executable, "-m", "bench.fleet", "--units", str(args.units), "--child", str(mq.port), mode],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=900,
                )
                runs[mode] = json.loads(out.stdout)
        finally:
            mq.stop()
    print(f"fleet: {args.units} units, clean backfill of 1.5 h (4 telegrams each), QoS 1, private Mosquitto")
    for mode, r in runs.items():
        extra = r["peak_mb"] - r["base_mb"]
        print(
            f"{mode:>9} connections ({r['connections']:>5}): opened in {r['connect_s']:5.2f} s, "
            f"peak RSS {r['peak_mb']:6.0f} MB (+{extra:.0f} MB over start-up), "
            f"{r['sent'] / r['seconds']:8,.0f} telegrams/s"
        )
    shared, own = runs["4"], runs["per-unit"]
    print(
        f"per-unit / shared: memory x{own['peak_mb'] / shared['peak_mb']:.2f}, "
        f"publish rate x{(own['sent'] / own['seconds']) / (shared['sent'] / shared['seconds']):.2f}; "
        f"{(own['peak_mb'] - shared['peak_mb']) * 1024 / own['connections']:.1f} KB per extra connection"
    )


if __name__ == "__main__":
    main()
