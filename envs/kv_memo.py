"""The KV envs' prefix memo (estimated mode): chunk records per (episode, decision prefix).

Trajectories that share their first chunks stream those chunks once, across groups, observation
queries and budgets: each record is kept with a snapshot of the stream after it (a forked cache),
and a prefix never streamed before continues from the deepest snapshot along it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from backends.kv.policies import KVPolicy
from backends.kv.stream import DocumentStreamer
from envs.kv_scoring import ChunkRecord

MAX_MEMO_CHUNKS = 200_000  # chunk records kept per env; cleared beyond
MAX_SNAPSHOTS = 256  # forked stream states kept (least recently used dropped)

NewStreamer = Callable[[str, int], DocumentStreamer]
PlayChunk = Callable[[DocumentStreamer, KVPolicy], ChunkRecord]


class PrefixMemo:
    """Chunk records and stream snapshots keyed by ``(split, sample_id, policies so far)``."""

    def __init__(self) -> None:
        self._records: dict[tuple, ChunkRecord] = {}
        self._snapshots: OrderedDict[tuple, DocumentStreamer] = OrderedDict()

    def records(self, split: str, sample_id: int, policies: Sequence[KVPolicy], new_streamer: NewStreamer,
                play: PlayChunk) -> list[ChunkRecord]:
        """The chunk records of an episode whose first chunks ran under ``policies``, streaming only
        the chunks never streamed before (``new_streamer`` starts an episode, ``play`` streams a chunk)."""
        if len(self._records) > MAX_MEMO_CHUNKS:
            self._records.clear()
        records, streamer = [], None
        for depth, policy in enumerate(policies):
            key = (split, sample_id, tuple(policies[: depth + 1]))
            record = self._records.get(key)
            if record is None:
                if streamer is None:
                    streamer = self._streamer_at(split, sample_id, policies[:depth], new_streamer, play)
                record = self._records[key] = play(streamer, policy)
                self._snapshots[key] = streamer.fork()
                while len(self._snapshots) > MAX_SNAPSHOTS:
                    self._snapshots.popitem(last=False)
            else:
                streamer = None  # the next miss starts from a snapshot
            records.append(record)
        return records

    def _streamer_at(self, split: str, sample_id: int, prefix: Sequence[KVPolicy], new_streamer: NewStreamer,
                     play: PlayChunk) -> DocumentStreamer:
        """A streamer after ``prefix``: the deepest snapshot on the prefix, advanced through the rest."""
        for depth in range(len(prefix), 0, -1):
            key = (split, sample_id, tuple(prefix[:depth]))
            snapshot = self._snapshots.get(key)
            if snapshot is not None:
                self._snapshots.move_to_end(key)
                streamer = snapshot.fork()
                break
        else:
            depth, streamer = 0, new_streamer(split, sample_id)
        for policy in prefix[depth:]:
            play(streamer, policy)
        return streamer
