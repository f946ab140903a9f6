"""Interactive TTFT samples passed from API replicas to the workers of a split deployment (`--role api` and
`--role worker`): the proxy measures them in the API process, the harvest controllers run in the workers.

Each replica keeps, per backend, its last `KEPT` samples and a count of every sample it has measured (`seq`), and
publishes both about once a second (store/workers.py). A worker remembers the `seq` it last saw of each replica and
backend and takes only the samples past it, so every worker gets every sample once, whichever reads first. A
replica seen for the first time, or one whose count went back (it restarted), counts from its next publication.
Pure: no I/O, no clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

KEPT = 500  # samples a replica publishes per backend: more than a second's worth at hundreds of requests a second


@dataclass(frozen=True, slots=True)
class Published:
    seq: int  # samples measured there since the replica started
    samples: tuple[float, ...]  # the last of them (at most KEPT), oldest first


class SampleLog:
    """A replica's side: what its proxy measured per backend, ready to publish."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self._seq: dict[str, int] = {}
        self._samples: dict[str, deque[float]] = {}

    def add(self, backend: str, samples: Iterable[float]) -> None:
        kept = self._samples.setdefault(backend, deque(maxlen=self.kept))
        for sample in samples:
            kept.append(sample)
            self._seq[backend] = self._seq.get(backend, 0) + 1

    def published(self) -> dict[str, Published]:
        return {backend: Published(self._seq.get(backend, 0), tuple(kept)) for backend, kept in self._samples.items()}


class SampleReader:
    """A worker's side: the samples it has not taken yet, per backend."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], int] = {}  # (replica, backend) -> its seq when last read

    def take(self, published: Mapping[str, Mapping[str, Published]]) -> dict[str, list[float]]:
        """From every replica's publication (backend -> replica -> what it published), the new samples per backend.
        Replicas no longer published are forgotten."""
        taken: dict[str, list[float]] = {}
        seen: dict[tuple[str, str], int] = {}
        for backend, by_replica in published.items():
            for replica, mine in by_replica.items():
                key = (replica, backend)
                seen[key] = mine.seq
                before = self._seen.get(key)
                if before is None or mine.seq <= before:
                    continue  # first seen, restarted, or nothing new
                new = min(mine.seq - before, len(mine.samples))
                taken.setdefault(backend, []).extend(mine.samples[len(mine.samples) - new :])
        self._seen = seen
        return taken
