"""The deployed run's grid: replies collected as they arrive, with a wait that grows to 0.25 s."""

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedra_core.polling import next_pause
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app import grid as grid_module
from server_app.grid import PromptGrid


@pytest.fixture(autouse=True)
def flowers_pull_waits() -> Iterable[None]:
    """A PromptGrid shortens Flower's waits for missing parts in its process: put them back after each test."""
    from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=import-outside-toplevel

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__ or {}) for f in functions]
    yield
    for function, defaults in zip(functions, saved):
        function.__kwdefaults__ = defaults


class QueuedReplies(StaticGrid):
    """A grid whose node ``i`` replies on the ``arrives[i]``-th pull (a transport that takes its time)."""

    def __init__(self, arrives: list[int]) -> None:
        super().__init__(list(range(1, len(arrives) + 1)))
        self.arrives, self.pulled, self.sent = arrives, 0, []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.sent = list(messages)
        for i, message in enumerate(self.sent):
            message.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulled += 1
        wanted = set(message_ids)
        return [Message(RecordDict({"config": ConfigRecord({"i": i})}), reply_to=m)
                for i, m in enumerate(self.sent)
                if self.arrives[i] == self.pulled and m.metadata.message_id in wanted]


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i + 1, message_type="train")
            for i in range(count)]


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses between pulls, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", recorded.append)
    return recorded


def test_every_reply_is_collected_with_short_then_growing_waits(waits: list[float]) -> None:
    transport = QueuedReplies([1, 3, 30])
    grid = PromptGrid(transport)
    replies = list(grid.send_and_receive(_messages(3), timeout=None))
    assert sorted(r.content["config"]["i"] for r in replies) == [0, 1, 2]
    assert transport.pulled == 30 and grid.pulls == 30  # no pull after the last reply
    assert waits[0] == pytest.approx(0.1) and all(b >= a for a, b in zip(waits, waits[1:]))
    assert max(waits) == pytest.approx(grid_module.MAX_WAIT) == 0.25  # at most every 0.25 s on a long round


def test_a_timeout_returns_the_replies_that_arrived(waits: list[float]) -> None:
    transport = QueuedReplies([1, 10 ** 6])
    replies = list(PromptGrid(transport).send_and_receive(_messages(2), timeout=0.0))
    assert [r.content["config"]["i"] for r in replies] == [0] and transport.pulled == 1


class Clock:
    """Stands in for the ``time`` module in the grid: ``sleep`` moves ``monotonic`` on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TimedReplies(QueuedReplies):
    """A grid whose node ``i`` has replied once the clock reads ``at[i]`` seconds after the push."""

    def __init__(self, clock: Clock, count: int) -> None:
        super().__init__([0] * count)
        self.clock, self.at, self.pushed_at = clock, [0.0] * count, 0.0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed_at = self.clock.now
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulled += 1
        wanted, elapsed = set(message_ids), self.clock.now - self.pushed_at
        return [Message(RecordDict({"config": ConfigRecord({"i": i})}), reply_to=m)
                for i, m in enumerate(self.sent) if self.at[i] <= elapsed and m.metadata.message_id in wanted]


def _exchange(grid: PromptGrid, transport: TimedReplies, clock: Clock, at: list[float],
              kind: str = "train") -> tuple[float, int]:
    """One exchange whose replies arrive at ``at``: (seconds from the last arrival to its collection, pulls)."""
    transport.at, pulls = at, transport.pulled
    messages = _messages(len(at))
    for message in messages:
        message.metadata.__dict__["_message_type"] = kind
    start = clock.now
    replies = list(grid.send_and_receive(messages, timeout=None))
    assert len(replies) == len(at)
    return clock.now - start - max(at), transport.pulled - pulls


def test_the_last_reply_is_collected_promptly_when_an_exchange_takes_as_long_as_the_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(grid_module, "time", clock)
    transport = TimedReplies(clock, 3)
    grid = PromptGrid(transport)
    late, first_pulls = _exchange(grid, transport, clock, [0.7, 1.9, 3.1])
    assert late > 0.15  # the growing wait: pulls 0.25 s apart by then
    late, pulls = _exchange(grid, transport, clock, [0.6, 2.0, 3.1])  # about as long: short pulls near the end
    assert late <= grid_module.NEAR_WAIT + 1e-9 and pulls <= first_pulls + 14
    late, _ = _exchange(grid, transport, clock, [0.5, 1.0, 7.5])  # much slower: the growing wait again
    assert late <= grid_module.MAX_WAIT + 1e-9
    late, _ = _exchange(grid, transport, clock, [0.2, 0.4], kind="evaluate")  # another kind: nothing known
    assert late <= 0.2


def test_pauses_never_sleep_into_the_window_and_grow_after_it() -> None:
    expected, near = 3.0, grid_module.NEAR_WAIT
    assert next_pause(0.0, 0.1, None, near) == 0.1
    assert next_pause(2.2, 0.5, expected, near) == pytest.approx(0.2)  # up to 0.8 x 3.0 s, not past it
    assert next_pause(2.5, 0.5, expected, near) == near
    assert next_pause(4.0, 0.5, expected, near) == 0.5
    assert next_pause(2.39, 0.5, expected, near) == near  # never a pause shorter than that


def test_a_deployed_serverapp_asks_again_for_a_replys_missing_part_within_a_fraction_of_a_second() -> None:
    """Flower's ServerApp waits 1 s before asking again for a part a node has not pushed yet; with the grid, 0.02 s."""
    code = ("from flwr.supercore.inflatable import inflatable_utils as u; from server_app.grid import PromptGrid; "
            "from flower_messages import StaticGrid; before = u.pull_objects.__kwdefaults__['initial_backoff']; "
            "PromptGrid(StaticGrid([1])); after = u.pull_objects.__kwdefaults__; "
            "print(before, after['initial_backoff'], after['backoff_cap'], after['max_time'])")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])})
    assert result.stdout.split() == ["1", "0.02", "0.2", "7200"]
