"""`Bus.consume(max_in_flight=N)` must never hold more than N messages: the bound is inference's
capacity and the bus's backpressure (docs: "no more than `max_in_flight` are held at once").

Found by the overload suite (tests/test_overload.py): with a capacity of 4 the inference consumer
had 8 messages delivered and unacknowledged. `offbeat.jetstream.Puller` counts what it asked for
against the caller's room, but (1) `fetch` returns up to `size` messages from its buffer whatever
`room` it was given, and (2) a request it has forgotten (past its deadline + EXPIRY_GRACE_S, e.g.
with the event loop busy) can still deliver, and those messages are counted against no request;
so messages delivered late are all handed over at once. This test puts the Puller in that state
(two requests of 4 outstanding, as after a forgotten one) and asks with room for 4.
"""

import pytest

from offbeat.bus import Bus, Publication
from offbeat.jetstream import Puller
from offbeat.testing import wait_for
from offbeat.v1 import rollout_pb2

pytestmark = pytest.mark.integration


async def test_a_pull_never_hands_over_more_than_the_room_asked_for(bus: Bus, run_id):
    await bus.publish_many(
        Publication(
            bus.subjects.rollout_request,
            rollout_pb2.RolloutRequest(run_id=run_id, request_id=f"r{i}", n=1, trajectory_ids=[f"r{i}-0"]),
            f"request:r{i}:0",
        )
        for i in range(8)
    )
    puller = await Puller(bus.nc, bus.subjects.stream, "inference", depth=1).start()
    try:
        await puller._ask(4, 5.0)  # the request the caller forgot, still delivering
        await puller._ask(4, 5.0)
        await wait_for(lambda: len(puller.buffer) == 8, timeout_s=10)
        got = await puller.fetch(4, 1.0, size=256)
        assert len(got) <= 4, f"room for 4, handed over {len(got)}"
    finally:
        await puller.close()
