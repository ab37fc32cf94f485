"""Teacher outputs written in shards by every rank at once, resumably: what `cache_teacher` and
`generate_targets` share.

A job's directory holds its manifest (a JSON file named by the job) and one file per shard of consecutive
examples. The shards still missing are dealt out to the ranks round by round (`rounds`); each is written whole
(a temporary file renamed), so a killed job, started again with the same settings, writes only the missing ones.
Within a shard, examples are batched by length (`batches`), so what a shard holds does not depend on the number
of ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ds_distill import dist
from ds_distill.config import run_dir
from ds_distill.errors import ConfigError


def read_manifest(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary file beside `path` (one per rank), then renamed to `path`."""
    tmp = path.with_name(f"{path.name}.tmp{dist.rank()}")
    write(tmp)
    os.replace(tmp, path)


def claim(directory: Path, manifest_name: str, manifest: dict, shard_path: Callable[[int], Path], what: str,
          overwrite: bool) -> list[int]:  # fmt: skip
    """Checks `directory` against the job (`manifest`, with `shards` and `complete`) on rank 0, and returns on
    every rank the shards still to write; raises its refusal on every rank. The same job resumes; one with other
    settings is refused unless `overwrite`; a directory holding something else is refused."""
    outcome = _claim(directory, manifest_name, manifest, shard_path, what, overwrite) if dist.is_main() else None
    outcome = dist.all_gather_objects(outcome)[0]
    if isinstance(outcome, str):
        raise ConfigError(outcome)
    return outcome


def _claim(directory, manifest_name, manifest, shard_path, what, overwrite) -> list[int] | str:
    existing = read_manifest(directory / manifest_name)
    differ = sorted(k for k, v in manifest.items() if k != "complete" and (existing or {}).get(k) != v)
    try:
        if existing is not None and differ and not overwrite:
            raise ConfigError(
                f"{directory} holds {what} written with other settings ({', '.join(differ)} differ); pass "
                "--overwrite to replace it or choose another --output_dir"
            )
        run_dir.check_replaceable(directory, manifest_name, what, "--output_dir")
    except ConfigError as error:
        return str(error)
    if differ:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        write_manifest(directory / manifest_name, manifest)
    return [s for s in range(manifest["shards"]) if not shard_path(s).is_file()]


def rounds(pending: list[int]) -> Iterator[tuple[int | None, int]]:
    """(this rank's shard or None, how many shards all ranks finish) per round: round r deals pending shards
    r x world ... to ranks 0, 1, ...; every rank sees every round (a ZeRO-3 teacher needs all in each forward)."""
    world, rank = dist.world_size(), dist.rank()
    for start in range(0, len(pending), world):
        yield (pending[start + rank] if start + rank < len(pending) else None), min(world, len(pending) - start)


def in_step(groups: list) -> Iterator:
    """This rank's `groups` of a round, then None until it has made as many calls as the busiest rank: a ZeRO-3
    teacher needs every rank in each forward, so an idle rank runs the others' on a stand-in."""
    calls = max(dist.all_gather_objects(len(groups)))
    yield from groups
    yield from [None] * (calls - len(groups))


def batches(shard: int, shard_examples: int, examples: int, lengths, batch_size: int) -> list[list[int]]:
    """Shard `shard`'s examples in batches of similar length, longest first."""
    first = shard * shard_examples
    indices = sorted(range(first, min(examples, first + shard_examples)), key=lambda i: -lengths[i])
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
