"""A fast QoS 1 publisher for the live ingest benchmark: encodes its share of the load, says "ready", waits for a
line on standard input, publishes over a few connections with a large in-flight window, then says "done".

    .venv/bin/python -m bench.publisher --port 1883 --telegrams 200000 --units 10000 --part 0 --parts 2
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench.ingest import fleet
from broker_bridge.mqtt import MqttClient


async def publish_all(port: int, messages: list[tuple[str, bytes]], connections: int, window: int, name: str) -> None:
    clients = [MqttClient(window=window) for _ in range(connections)]
    for i, c in enumerate(clients):
        await c.connect("127.0.0.1", port, f"{name}-{i}", clean_start=True)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def one_connection(client: MqttClient, share: list[tuple[str, bytes]]) -> None:
        slots = asyncio.Semaphore(window)
        tasks: set[asyncio.Task[None]] = set()
        for topic, payload in share:
            await slots.acquire()
            task = asyncio.create_task(client.publish(topic, payload))
            task.add_done_callback(lambda t: (slots.release(), tasks.discard(t)))
            tasks.add(task)
        while tasks:
            await asyncio.gather(*list(tasks))

    await asyncio.gather(*(one_connection(c, messages[i::connections]) for i, c in enumerate(clients)))
    for c in clients:
        await c.disconnect()
    print("done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--telegrams", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--part", type=int, default=0, help="this process publishes every PARTS-th telegram from PART")
    ap.add_argument("--parts", type=int, default=1)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--window", type=int, default=1000)
    args = ap.parse_args()
    messages = fleet(args.units, args.telegrams)[args.part :: args.parts]
    asyncio.run(publish_all(args.port, messages, args.connections, args.window, f"bench-pub-{args.part}"))


if __name__ == "__main__":
    main()
