"""A lost rank stops the job within seconds, and every survivor says which rank was lost.

When a node dies mid-run, the survivors' next collective either fails at once with a socket error that names no
rank (gloo: "Connection reset by peer [10.0.0.2]:41234"), or waits for the process group's timeout (NCCL, or a
node that vanished without closing its sockets: `train.ddp_timeout`, 30 minutes by default). So each rank runs
a daemon thread beside its work:

- every rank but 0 adds 1 to its own counter in the rendezvous store every `interval_s`;
- rank 0 (whose process holds the store) reads all counters in one round trip; a counter that has not moved for
  `lost_after_s` is a lost rank, and rank 0 writes that verdict to the store;
- the other ranks read the verdict, or find the store itself gone, which means rank 0 (or its node) was lost.
  The store ends with rank 0, and rank 0 ends when it leaves or when a rank of its node leaves (the launcher
  then stops its node's ranks), so a rank that has the verdict says so in the store and waits (at most
  `READ_WAIT_PERIODS` watch periods) until every other rank still beating has read it too;
- every rank that reaches a verdict prints it, naming the lost rank, its node and host, and leaves at once
  (`os._exit`: its main thread may be blocked in a collective). The launcher on each node then stops its other
  ranks, and the same command run again resumes from the newest complete checkpoint.

The thread beats while the rank's main thread computes, loads or waits; only a dead (or frozen) process stops
beating. `DS_DISTILL_PEER_TIMEOUT` (seconds, default 30) sets `lost_after_s`; 0 turns the watch off.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import ClassVar

import torch

INTERVAL_S = 2.0
READ_WAIT_PERIODS = 3
LOST_AFTER_S = float(os.environ.get("DS_DISTILL_PEER_TIMEOUT", 30))
EXIT_STATUS = 1


def node_of_this_rank() -> str:
    """'node N, host H': the node rank as the launcher numbered it (DeepSpeed, torchrun or SLURM), and the host."""
    node = next((os.environ[k] for k in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID") if k in os.environ), "?")
    return f"node {node}, host {socket.gethostname()}"


class Watch(threading.Thread):
    """The watch of one rank over the others, through `store` (a client of the rendezvous store). `on_lost`
    receives the verdict; the default prints it and ends the process."""

    running: ClassVar[Watch | None] = None
    """The process's own watch, from `start` to `stop` (tests start others, which are not it)."""

    def __init__(self, store, rank: int, world_size: int, *, where: str, interval_s: float = INTERVAL_S,
                 lost_after_s: float = LOST_AFTER_S, on_lost: Callable[[str], None] | None = None):  # fmt: skip
        super().__init__(name="ds_distill-peer-watch", daemon=True)
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval_s, self.lost_after_s = interval_s, lost_after_s
        self.on_lost = on_lost or _report_and_exit
        self.verdict: str | None = None
        self._ending = threading.Event()
        store.set(f"where/{rank}", where)
        if rank == 0:
            for other in range(1, world_size):
                store.add(f"beat/{other}", 0)  # every counter exists before rank 0 reads them all at once

    def run(self) -> None:
        last_counts: dict[int, int] = {}
        last_moved: dict[int, float] = {}
        rank_0 = None
        while not self._ending.wait(self.interval_s):
            verdict, beating = None, []
            try:
                if self.rank == 0:
                    verdict, beating = self._look_at_the_others(last_counts, last_moved)
                else:
                    if rank_0 is None and self.store.check(["where/0"]):
                        rank_0 = self.store.get("where/0").decode()
                    self.store.add(f"beat/{self.rank}", 1)
                    verdict = self.store.get("lost").decode() if self.store.check(["lost"]) else None
                    if verdict:
                        lost = int(self.store.get("lost_rank"))
                        beating = [r for r in range(self.world_size) if r not in (self.rank, lost)]
            except Exception as error:  # noqa: BLE001 - any failure to reach the store means its holder is gone
                if self._ending.is_set():
                    return
                if verdict is None:  # (one already read stands)
                    verdict = (f"rank 0 ({rank_0 or 'where unknown'}) was lost: the rendezvous store it holds "
                               f"stopped answering ({type(error).__name__}: {str(error).splitlines()[0][:200]})")  # fmt: skip
            if verdict:
                self.verdict = verdict
                if beating:  # (none when the store is gone)
                    self._wait_until_read(beating)
                self.on_lost(f"rank {self.rank} stops: {verdict}")
                return

    def _look_at_the_others(self, last_counts: dict[int, int], last_moved: dict[int, float]):
        """(verdict, the other ranks still beating) once a rank is lost, else (None, [])."""
        others = list(range(1, self.world_size))
        counts = [int(v) for v in self.store.multi_get([f"beat/{r}" for r in others])]
        now = time.monotonic()
        for other, count in zip(others, counts):
            if last_counts.get(other) != count:
                last_counts[other], last_moved[other] = count, now
            elif now - last_moved[other] > self.lost_after_s and not self.store.check([f"done/{other}"]):
                known = self.store.check([f"where/{other}"])
                where = self.store.get(f"where/{other}").decode() if known else "where unknown"
                verdict = (f"rank {other} ({where}) was lost: its process or its node ended, no sign of life for "
                           f"{now - last_moved[other]:.0f} s")  # fmt: skip
                self.store.set("lost_rank", str(other))
                self.store.set("lost", verdict)
                # the others still beating: not the rest of a lost node
                beating = [r for r in others if now - last_moved[r] < 3 * self.interval_s]
                return verdict, beating
        return None, []

    def _wait_until_read(self, ranks: list[int]) -> None:
        """Says in the store that this rank has the verdict, and waits until each of `ranks` has it too or has
        ended cleanly: at most `READ_WAIT_PERIODS` watch periods (a rank lost at the same time never reads it),
        less if the store ends meanwhile (its holder has left, the verdict read)."""
        deadline = time.monotonic() + READ_WAIT_PERIODS * self.interval_s
        try:
            self.store.set(f"read/{self.rank}", "1")
            while ranks and time.monotonic() < deadline:
                time.sleep(min(0.1, self.interval_s / 4))
                ranks = [r for r in ranks if not (self.store.check([f"read/{r}"]) or self.store.check([f"done/{r}"]))]
        except Exception:  # noqa: BLE001 - the store ended: nobody is left to read it
            return

    def stop(self) -> None:
        """Ends the watch of this rank (a clean end: the others will not take its silence for a loss)."""
        self._ending.set()
        self.join()
        if self.verdict is None:
            try:
                self.store.set(f"done/{self.rank}", "1")
            except Exception:  # noqa: BLE001 - the store's holder ended first; nothing is left to tell
                pass


def _report_and_exit(message: str) -> None:
    print(f"error: {message}. Its newest complete checkpoint is kept: run again with --resume (the launch scripts "
          "pass --resume=auto: the same command) to go on from it.", file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.flush()
    os._exit(EXIT_STATUS)


def start(rank: int, world_size: int) -> None:
    """Starts this rank's watch on the store at MASTER_ADDR:MASTER_PORT (called by `dist.init`)."""
    if world_size < 2 or LOST_AFTER_S <= 0 or Watch.running is not None or "MASTER_ADDR" not in os.environ:
        return
    client = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=LOST_AFTER_S), wait_for_workers=False,
    )  # fmt: skip
    store = torch.distributed.PrefixStore("ds_distill/peers/", client)
    Watch.running = Watch(store, rank, world_size, where=node_of_this_rank())
    Watch.running.start()


def stop() -> None:
    if Watch.running is not None:
        Watch.running.stop()
        Watch.running = None


def looks_like_a_lost_peer(error: BaseException) -> bool:
    """A collective or the store failed: a closed connection, a reset, a timeout."""
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe")
    )


def explain(error: BaseException) -> None:
    """After `error` in the main thread: when it looks like a lost rank, waits for the watch's verdict (which
    ends the process, naming the rank), at most as long as the watch takes to reach one and have it read;
    returns when there is none."""
    watch = Watch.running
    if watch is not None and looks_like_a_lost_peer(error):
        # the watch ends only with a verdict (after waiting for the others to read it) or stop()
        watch.join(watch.lost_after_s + (3 + READ_WAIT_PERIODS) * watch.interval_s)
