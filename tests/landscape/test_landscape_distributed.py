"""Probes across processes: two gloo ranks, each with its share, equal one process on all data."""

from __future__ import annotations

import math

import pytest
import torch

from bnlab import landscape as L
from helpers import run_ranks
from landscape import landscape_dist_worker as worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(worker.__file__, tmp_path_factory.mktemp("landscape_dist"))


def _close(got, want, path="") -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and path.endswith(("evaluations",)):
        assert got == want, path
    elif isinstance(want, float) and math.isfinite(want):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), path
    else:
        assert got == want, path


def test_every_rank_gets_the_same_result(rank_results):
    assert rank_results[0] == rank_results[1]


@pytest.mark.parametrize("kind", worker.KINDS)
def test_two_ranks_equal_one_process_on_the_whole_data(rank_results, kind):
    shares = worker.shares()
    if kind != "bn_per_rank":  # statistics over all ranks: the shares' union is one batch
        data = (torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares]))
    else:  # each share normalized by its own statistics, as a loader of the shares is
        data = shares
    single = worker.measure(kind, data)
    if kind == "bn":
        assert "is not supported" in rank_results[0][kind].pop("refused")
    for probe in single:
        got = rank_results[0][kind][probe]
        if isinstance(single[probe], dict):
            single[probe].pop("num_batches", None)
            got = {k: v for k, v in got.items() if k != "num_batches"}
        _close(got, single[probe], f"{kind}.{probe}")


def test_across_ranks_needs_a_process_group():
    with pytest.raises(ValueError, match=r"initialized torch\.distributed process group"):
        L.across_ranks(worker.shares()[0])
