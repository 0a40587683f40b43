"""Cross-process statistics: two gloo processes equal one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch

import dist_worker
from helpers import run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(dist_worker.__file__, tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("kind", dist_worker.KINDS)
def test_two_processes_match_one_process_on_the_concatenated_batch(rank_results, kind):
    single = dist_worker.run(kind, slice(None))
    per_rank = [r[kind] for r in rank_results]
    for key in ("y", "dx"):
        for step, expected in enumerate(single[key]):
            got = torch.cat([r[key][step] for r in per_rank])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{kind} {key}")
    for key in ("dweight", "dbias"):
        for step, expected in enumerate(single[key]):
            for r in per_rank:
                torch.testing.assert_close(r[key][step], expected, rtol=1e-5, atol=1e-5)
    for r in per_rank:
        for got, expected in zip(r["buffers"], single["buffers"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
