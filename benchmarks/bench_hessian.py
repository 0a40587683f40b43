"""bnlab's Hessian probes against PyHessian, hessian-eigenthings and curvlinops (+ scipy eigsh):
``python benchmarks/bench_hessian.py``.

The same as ``bnlab bench hessian`` (options: ``--help``); see ``bnlab.bench.curvature_tools``.
"""

from bnlab.bench.curvature_tools import command

if __name__ == "__main__":
    command()
