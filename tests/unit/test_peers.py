"""The peer watch (ds_distill/peers.py) on a real TCPStore in this process: a silent rank is named by rank 0 and
by every other rank within one watch period, a rank that ended cleanly is not, and a lost store names rank 0."""

from __future__ import annotations

import datetime
import time

import pytest
import torch

from ds_distill import peers

INTERVAL, LOST_AFTER = 0.05, 0.5


def store_client(port: int):
    client = torch.distributed.TCPStore(
        "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=2)
    )
    return torch.distributed.PrefixStore("ds_distill/peers/", client)


def watches(port: int, world_size: int, verdicts: dict, store_ends_with=(), store=None) -> list[peers.Watch]:
    """One watch per rank, each recording its verdict. The ranks in `store_ends_with` (rank 0 and the others of
    its node) end the store when they leave, as the real ones do: rank 0 holds it, and the launcher of its node
    stops every rank there when one leaves. `store`: a list holding the store."""
    out = []

    def on_lost(rank, message):
        verdicts.setdefault(rank, (message, time.monotonic()))
        if rank in store_ends_with:
            store.clear()

    for rank in range(world_size):
        watch = peers.Watch(
            store_client(port), rank, world_size, where=f"node {rank}, host h{rank}", interval_s=INTERVAL,
            lost_after_s=LOST_AFTER, on_lost=lambda message, rank=rank: on_lost(rank, message),
        )  # fmt: skip
        out.append(watch)
    for watch in out:
        watch.start()
    return out


def test_a_silent_rank_is_named_by_every_other_and_a_cleanly_ended_one_by_none():
    """Ranks 0 and 2 share a node, whose launcher ends both (and the store rank 0 holds) as soon as either
    leaves: every survivor has read the verdict by then, so none takes the store's end for rank 0's loss."""
    store = [torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)]
    verdicts = {}
    ranks = watches(store[0].port, 5, verdicts, store_ends_with=(0, 2), store=store)
    time.sleep(5 * LOST_AFTER)
    assert verdicts == {}  # beating ranks are never taken for lost
    ranks[1].stop()  # ends cleanly
    time.sleep(2 * LOST_AFTER)
    assert verdicts == {}
    ranks[4]._ending.set()  # falls silent as a killed process does, without saying it ended
    ranks[4].join()
    silent_at = time.monotonic()
    time.sleep(LOST_AFTER + 16 * INTERVAL)
    assert sorted(verdicts) == [0, 2, 3] and not store  # every live rank reaches the verdict; the store has ended
    for rank, (message, when) in verdicts.items():
        assert message.startswith(f"rank {rank} stops: rank 4 (node 4, host h4) was lost")
        assert when - silent_at < LOST_AFTER + (3 + peers.READ_WAIT_PERIODS) * INTERVAL
    for watch in ranks:
        watch.stop()


def test_the_store_gone_names_rank_0_its_holder():
    master = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    verdicts = {}
    rank_0, rank_1 = watches(master.port, 2, verdicts)
    time.sleep(4 * INTERVAL)
    rank_0._ending.set()
    rank_0.join()
    del master, rank_0  # rank 0's process ends, and the store it holds with it
    deadline = time.monotonic() + 5
    while 1 not in verdicts and time.monotonic() < deadline:
        time.sleep(INTERVAL)
    assert verdicts[1][0].startswith("rank 1 stops: rank 0 (node 0, host h0) was lost: the rendezvous store it holds")


def test_only_errors_of_collectives_or_the_store_wait_for_a_verdict():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:40583: Connection reset by peer.")
    assert peers.looks_like_a_lost_peer(gloo)
    assert peers.looks_like_a_lost_peer(torch.distributed.DistNetworkError("Failed to recv, got 0 bytes."))
    assert not peers.looks_like_a_lost_peer(ValueError("a bug of our own"))
    assert not peers.looks_like_a_lost_peer(RuntimeError("shape mismatch"))


@pytest.fixture(autouse=True)
def no_watch_left():
    yield
    assert peers.Watch.running is None  # these tests never start the process's own watch
