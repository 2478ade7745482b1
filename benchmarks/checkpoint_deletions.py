"""How fast one driver deletes the checkpoints `num_to_keep` drops, on a bucket with a round trip.

    python benchmarks/checkpoint_deletions.py
    python benchmarks/checkpoint_deletions.py --checkpoints 300 --rtt-ms 0 25 --rate 128

toxtune's trials checkpoint every epoch and keep the newest two (`num_to_keep`), so the driver
deletes a checkpoint for every one saved: 64 GPU trials at 0.5 s an epoch drop 128 a second.
The bucket is moto's S3 server in a process of its own, reached through a proxy in this process
that holds every answer `--rtt-ms` before passing it on (a real bucket's round trip is some
tens of milliseconds; 0 is loopback, where moto's own CPU is the cost). Each checkpoint is two
objects, as toxtune's are (a 64 KiB model file and its best report), spread over 64 trial
folders. For each round trip, two ways:

- `one at a time` (toxtune before 2026-12-07, at one deletion thread): pyarrow's `delete_dir`
  a checkpoint, one after another (five requests each);
- `batched, backlog` (`tune.bridge.CheckpointDeletions`, `tune.storage.delete_folders`): all
  of them queued at once, as a backlog, and the thread's batches;
- `batched`: the same, queued as Tune queues them, `--rate` a second.

Measured: checkpoints deleted a second (the first two: what one driver can delete; the third is
held to `--rate` by its queueing), the lag (seconds from the last checkpoint queued to the last
deleted: near 0 means the thread kept up), requests to the bucket a checkpoint (moto's access
log), and the checkpoint objects left (0: every one deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import free_port, wait_http
from tests.team_stack import TcpProxy

BUCKET = "toxtune-bench"
TRIALS = 64
WAYS = ("one at a time", "batched, backlog", "batched")
FILES = {"model.pt": b"m" * 65_536, "best_row.json": b'{"val_roc_auc": 0.8}'}


class SlowProxy(TcpProxy):
    """`TcpProxy` that holds each chunk the server sends `delay` seconds: a round trip."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.delay = delay
        self._servers: set[socket.socket] = set()
        super().__init__(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        if self.delay and src.getpeername() == self.upstream:
            try:
                while data := src.recv(65536):
                    time.sleep(self.delay)
                    dst.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        super()._pump(src, dst)


def fill(fs: object, n: int, tag: str) -> list[str]:
    """`n` checkpoints of two objects, spread over TRIALS trial folders; their paths."""
    paths = [f"{BUCKET}/job/t{i % TRIALS:02d}/{tag}_{i:06d}" for i in range(n)]

    def put(path: str) -> None:
        for name, data in FILES.items():
            with fs.open_output_stream(f"{path}/{name}") as out:  # type: ignore[attr-defined]
                out.write(data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, paths))
    return paths


def requests_in(log: Path, since: int) -> int:
    return sum(1 for line in log.read_text().splitlines()[since:] if "HTTP/1.1" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 25.0])
    parser.add_argument("--rate", type=float, default=128.0, help="checkpoints dropped a second")
    args = parser.parse_args()

    import boto3
    import pyarrow
    import pyarrow.fs as pafs

    from tune import bridge

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"pyarrow {pyarrow.__version__}, boto3 {boto3.__version__}")
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="toxtune-deletions-"))
    log = scratch / "moto.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
        direct = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=direct, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        maker = pafs.S3FileSystem(endpoint_override=direct, region="us-east-1")
        rows = []
        for rtt in args.rtt_ms:
            proxy = SlowProxy(("127.0.0.1", port), rtt / 1000)
            fs = pafs.S3FileSystem(
                endpoint_override=f"http://127.0.0.1:{proxy.port}", region="us-east-1"
            )
            for k, way in enumerate(WAYS):
                paths = fill(maker, args.checkpoints, f"checkpoint{k}")
                since = len(log.read_text().splitlines())
                start = time.monotonic()
                lag = float("nan")
                if way == "one at a time":
                    for path in paths:
                        fs.delete_dir(path)
                else:
                    deletions = bridge.CheckpointDeletions()
                    deletions.setup()
                    for i, path in enumerate(paths):
                        delay = start + i / args.rate - time.monotonic() if way == "batched" else 0
                        if delay > 0:
                            time.sleep(delay)
                        deletions.enqueue(fs, path)
                    queued = time.monotonic()
                    deletions.on_experiment_end(trials=[])
                    lag = time.monotonic() - queued
                seconds = time.monotonic() - start
                time.sleep(0.5)  # moto's log lines of the last requests
                requests = requests_in(log, since)
                left = maker.get_file_info(
                    pafs.FileSelector(f"{BUCKET}/job", recursive=True, allow_not_found=True)
                )
                files = [i.path for i in left if i.type == pafs.FileType.File]
                rows.append((rtt, way, seconds, lag, requests, len(files)))
                for path in files:  # the next way starts with an empty folder
                    maker.delete_file(path)
            proxy.cut()
        n = args.checkpoints
        print(f"\n{n} checkpoints of {len(FILES)} objects; batched: queued at {args.rate:g}/s")
        head = f"{'RTT ms':>6}  {'way':<14}{'seconds':>8}{'deleted/s':>10}{'lag s':>7}"
        print(head + f"{'requests/ckpt':>14}{'objects left':>13}")
        for rtt, way, seconds, lag, requests, left in rows:
            print(
                f"{rtt:>6g}  {way:<14}{seconds:>8.1f}{n / seconds:>10.1f}{lag:>7.2f}"
                f"{requests / n:>14.2f}{left:>13}"
            )
    finally:
        moto.terminate()
        moto.wait(timeout=30)


if __name__ == "__main__":
    main()
