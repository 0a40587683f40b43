"""bnlab's normalization layers against torch.nn.BatchNorm*: ``python benchmarks/bench_layers.py``.

The same as ``bnlab bench layers`` (options: ``--help``); see ``bnlab.bench.layers``.
"""

from bnlab.bench.layers import command

if __name__ == "__main__":
    command()
