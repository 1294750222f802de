"""Uniformly random tokens, reproducible by seed: the floor any method must clear."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, MethodOptions, Selection, VisionEvidence, register_method
from .common import candidate_positions, check_count, make_selection, split_rows


@dataclass(frozen=True)
class RandomOptions(MethodOptions):
    """``seed``: the seed of the draw (an integer >= 0)."""

    seed: int = 0

    def __post_init__(self) -> None:
        self._check_int("seed", 0)
        if self.seed >= 2**63:
            raise ValueError(f"option 'seed' must be below 2**63 (torch's generator takes a 64-bit seed), got {self.seed}")


def random_rows(num_candidates: int, tokens: int, seed: int) -> torch.Tensor:
    """``tokens`` of ``num_candidates`` positions drawn uniformly without replacement, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_candidates, generator=generator)[:tokens].sort().values


def select(evidence: VisionEvidence, tokens: int, options: RandomOptions) -> Selection:
    geometry = evidence.geometry
    check_count("random", tokens, geometry)
    rows = candidate_positions(geometry)
    return make_selection(geometry, split_rows(geometry, rows[random_rows(len(rows), tokens, options.seed)]))


RANDOM = register_method(
    Method(
        "random",
        "uniformly random tokens, reproducible by seed",
        options=RandomOptions,
        select=select,
        signal="none (seeded uniform draw)",
        partition_policy="global",
    )
)
