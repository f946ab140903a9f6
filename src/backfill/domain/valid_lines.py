"""Validated lines, their lease order, and a compact way to hold a million of them.

A `ValidLine` object costs ~200 bytes with its ints; `LineColumns` keeps the same fields in typed arrays (plus one
list of custom_id strings), ~100 bytes a line, so that validating a 1,000,000-line batch stays within a worker's
memory budget (BENCHMARKS.md, "embeddings"). It reads as a `Sequence[ValidLine]`, building each line on demand.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import overload

from backfill.domain.estimates import expected_output_tokens

_NO_CAP = -1  # max_output_tokens None in a column of ints

# A line as the store inserts it: number, custom_id, offset, length, est_prompt_tokens, max_output_tokens,
# prefix_group.
Row = tuple[int, str, int, int, int, int | None, int]


@dataclass(frozen=True, slots=True)
class ValidLine:
    number: int
    custom_id: str
    offset: int
    length: int
    est_prompt_tokens: int
    max_output_tokens: int | None = None
    prefix_key: int = 0  # see domain/estimates.py
    prefix_group: int = 0  # lease rank, see group_by_prefix


class LineColumns(Sequence[ValidLine]):
    """Valid lines in input order, one typed array a field."""

    __slots__ = ("_custom_ids", "_est", "_groups", "_keys", "_lengths", "_max_out", "_numbers", "_offsets")

    def __init__(self) -> None:
        self._numbers = array("i")  # up to 2**31: far above any max_lines
        self._custom_ids: list[str] = []
        self._offsets = array("q")
        self._lengths = array("i")  # at most max_line_bytes
        self._est = array("i")  # a quarter of the length
        # Columns most batches leave at their default (embeddings: no cap, no prefix) cost nothing until a line
        # sets one.
        self._max_out: array[int] | None = None
        self._keys: array[int] | None = None
        self._groups: Sequence[int] | None = None  # lease ranks, once `ranked`

    def append(self, line: ValidLine) -> None:
        """Add a line (its `prefix_group` is not kept: ranks come from `ranked`)."""
        self.add(
            line.number, line.custom_id, line.offset, line.length, line.est_prompt_tokens, line.max_output_tokens,
            line.prefix_key,
        )  # fmt: skip

    def add(
        self,
        number: int,
        custom_id: str,
        offset: int,
        length: int,
        est_prompt_tokens: int,
        max_output_tokens: int | None,
        prefix_key: int,
    ) -> None:
        """`append` from the fields, with no `ValidLine` built (the validator adds every line of a file)."""
        self._numbers.append(number)
        self._custom_ids.append(custom_id)
        self._offsets.append(offset)
        self._lengths.append(length)
        self._est.append(est_prompt_tokens)
        cap = _NO_CAP if max_output_tokens is None else max_output_tokens
        if cap != _NO_CAP and self._max_out is None:
            self._max_out = _filled(_NO_CAP, len(self._numbers) - 1)
        if self._max_out is not None:
            self._max_out.append(cap)
        if prefix_key and self._keys is None:
            self._keys = _filled(0, len(self._numbers) - 1)
        if self._keys is not None:
            self._keys.append(prefix_key)

    def rows(self, start: int, stop: int) -> list[Row]:
        """Lines [start, stop) as `Row`s, with no `ValidLine` built."""
        stop = min(stop, len(self))
        count = max(0, stop - start)
        caps: Sequence[int | None] = (
            [None] * count
            if self._max_out is None
            else [None if cap == _NO_CAP else cap for cap in self._max_out[start:stop]]
        )
        groups = [0] * count if self._groups is None else self._groups[start:stop]
        return list(
            zip(
                self._numbers[start:stop],
                self._custom_ids[start:stop],
                self._offsets[start:stop],
                self._lengths[start:stop],
                self._est[start:stop],
                caps,
                groups,
                strict=True,
            )
        )

    def __len__(self) -> int:
        return len(self._numbers)

    @overload
    def __getitem__(self, index: int) -> ValidLine: ...
    @overload
    def __getitem__(self, index: slice) -> list[ValidLine]: ...
    def __getitem__(self, index: int | slice) -> ValidLine | list[ValidLine]:
        if isinstance(index, slice):
            return [self._line(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._line(index)

    def __iter__(self) -> Iterator[ValidLine]:
        return (self._line(i) for i in range(len(self)))

    def _line(self, i: int) -> ValidLine:
        cap = _NO_CAP if self._max_out is None else self._max_out[i]
        return ValidLine(
            self._numbers[i],
            self._custom_ids[i],
            self._offsets[i],
            self._lengths[i],
            self._est[i],
            None if cap == _NO_CAP else cap,
            0 if self._keys is None else self._keys[i],
            0 if self._groups is None else self._groups[i],
        )

    def estimates(self) -> tuple[int, int]:
        """Total estimated prompt and expected output tokens, summed from the columns (no line built)."""
        caps = self._max_out
        output = expected_output_tokens(None) * len(self) if caps is None else sum(map(_expected_output, caps))
        return sum(self._est), output

    def ranked(self) -> LineColumns:
        """The same lines with their lease ranks (`group_by_prefix`)."""
        ranked = LineColumns()
        for name in LineColumns.__slots__:
            setattr(ranked, name, getattr(self, name))
        ranked._groups = range(len(self)) if self._keys is None else lease_ranks(self._keys)
        return ranked


def _filled(value: int, count: int) -> array[int]:
    return array("q", [value]) * count


def rows(lines: Sequence[ValidLine], start: int, stop: int) -> list[Row]:
    """Lines [start, stop) as (number, custom_id, offset, length, est_prompt_tokens, max_output_tokens,
    prefix_group): what the store inserts."""
    if isinstance(lines, LineColumns):
        return lines.rows(start, stop)  # straight from the columns
    return [
        (line.number, line.custom_id, line.offset, line.length, line.est_prompt_tokens, line.max_output_tokens,
         line.prefix_group)
        for line in lines[start:stop]
    ]  # fmt: skip


def estimates(lines: Sequence[ValidLine]) -> tuple[int, int]:
    """The lines' estimated prompt tokens and expected output tokens, in total (what a batch is priced at)."""
    if isinstance(lines, LineColumns):
        return lines.estimates()  # a million lines: no million objects built on the event loop
    prompt = sum(line.est_prompt_tokens for line in lines)
    return prompt, sum(expected_output_tokens(line.max_output_tokens) for line in lines)


def _expected_output(cap: int) -> int:
    return expected_output_tokens(None if cap == _NO_CAP else cap)


def group_by_prefix(lines: Sequence[ValidLine]) -> Sequence[ValidLine]:
    """Set each line's lease rank (`prefix_group`): leasing in rank order runs lines that share a prompt prefix
    together, one group after another in the order the prefixes first appear, each group's first line (its
    *leader*) one group ahead of the rest. Lines that share no prefix keep their place in input order.

    Why the leader goes ahead: lines admitted in the same engine iteration cannot reuse each other's prefix (a
    block is cached once it is computed), so a group released all at once computes its prefix several times.
    Why only one group ahead: a prefix computed long before its group runs is evicted by the blocks computed
    meanwhile (the engine caches every full block, unique suffixes too) and is computed again.
    """
    if isinstance(lines, LineColumns):
        return lines.ranked()
    ranks = lease_ranks([line.prefix_key for line in lines])
    return [replace(line, prefix_group=rank) for line, rank in zip(lines, ranks, strict=True)]


def lease_ranks(keys: Sequence[int]) -> Sequence[int]:
    """Each line's lease rank from its prefix key (0: none), by position: see `group_by_prefix`."""
    if not any(keys):
        return range(len(keys))  # nothing to group (embeddings, for one): input order, in no memory at all
    groups: list[list[int]] = []  # positions, leader first
    by_key: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        if key and key in by_key:
            by_key[key].append(position)
            continue
        members = [position]
        groups.append(members)
        if key:
            by_key[key] = members
    ranks = array("q", bytes(8 * len(keys)))
    order: list[int] = [groups[0][0]]
    for index, members in enumerate(groups):
        if index + 1 < len(groups):
            order.append(groups[index + 1][0])  # the next group's leader, ahead of this group's followers
        order.extend(members[1:])
    for rank, position in enumerate(order):
        ranks[position] = rank
    return ranks
