"""What noisy BatchNorm must cost at least, against what it costs: ``python
benchmarks/noise_floor.py`` (one thread, thread CPU time; ``--quick`` for fewer repeats).

Algorithm 1 draws, at every training step, a uniform m and a normal s for every activation. On
the kernels each draw is one keyed hash of the activation's position and, for s, a second hash
and an odd polynomial of the sum of four 12-bit digits (``bnlab.functional.noise.normals``).
The "draws" column times exactly that work for the shape's number of activations (a numba loop
over the loops' own draw function, the draws written to a scratch run that stays in
L1: nothing applied, nothing stored), which any implementation of this noise adds to
BatchNorm's forward. So

    bound = (bnlab BatchNorm forward+backward + draws) / torch.nn BatchNorm forward+backward

is a floor under noisy BatchNorm's ratio to torch.nn for this noise on this machine; "noisy"
is the measured ratio (``bnlab bench layers``' timing, interleaved with the other two).
"""

from __future__ import annotations

import functools
import time

import click
import numpy as np
import torch
from numba import njit

from bnlab.bench.layers import (
    FORMATS,
    QUICK_SHAPES,
    SHAPES,
    _call,
    _torch_layer,
    make_layer,
    set_threads,
    time_interleaved,
)
from bnlab.functional.kernels.runtime import load_loops


@functools.cache
def _draw_loop():  # type: ignore[no-untyped-def]
    load_loops()
    from bnlab.functional.kernels.loops import noise_draws as nd
    from bnlab.functional.kernels.loops.loop_common import _ELEMENTWISE

    draw, iota = nd._draws, nd._iota
    run_length, unit_scale = nd._RUN, nd._UNIT_SCALE

    @njit(cache=False, fastmath=_ELEMENTWISE)  # the normalizing loops' flags (contraction)
    def draws(n, key, u, z):  # type: ignore[no-untyped-def]
        """u, z of activations 0 .. n - 1 (as the forward makes them), in runs of _RUN."""
        offsets = iota()
        k0, k1 = np.uint32(key[0]), np.uint32(key[1])
        unit = u.dtype.type(unit_scale)
        total = 0.0
        for s0 in range(0, n, run_length):
            run = min(run_length, n - s0)
            first = np.uint32(s0)
            for i in range(run):
                u[i], z[i] = draw(np.uint32(offsets[i] + first), k0, k1, unit, u)
            total += z[0] + u[0]  # keeps the loop's results live
        return total

    return draws, run_length


def _draw_seconds(numel: int, repeats: int) -> float:
    draws, run_length = _draw_loop()
    u, z = np.empty(run_length, np.float32), np.empty(run_length, np.float32)
    key = np.array([0x1234567, 0x7654321], dtype=np.uint64)
    draws(numel, key, u, z)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        draws(numel, key, u, z)
        times.append(time.thread_time() - start)
    return min(times)


@click.command()
@click.option("--quick", is_flag=True, help="Fewer repeats, no (128, 64, 56, 56).")
def main(quick: bool) -> None:
    """Print the floor and the measured ratio per benchmark shape and format."""
    set_threads(1, True)
    repeats = 5 if quick else 15
    print("| shape | format | torch ms | bnlab BN ms | draws ms | bound | noisy |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for shape in QUICK_SHAPES if quick else SHAPES:
        numel = int(np.prod(shape))
        draw_s = _draw_seconds(numel, 3 * repeats)
        for fmt in FORMATS if len(shape) == 4 else FORMATS[:1]:
            x = torch.randn(shape)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            dy = torch.randn_like(x)
            calls = {
                name: _call(layer, x, dy, "train_fwd_bwd")
                for name, layer in (
                    ("torch", _torch_layer(shape[1], len(shape))),
                    ("bn", make_layer("bn", shape[1], len(shape))),
                    ("noisy", make_layer("noisy_bn", shape[1], len(shape))),
                )
            }
            t = time_interleaved(calls, repeats, 3, 0.01 if quick else 0.02, time.thread_time)
            bound = (t["bn"] + draw_s) / t["torch"]
            print(
                f"| {'x'.join(map(str, shape))} | {fmt} | {t['torch'] * 1e3:.3f} | "
                f"{t['bn'] * 1e3:.3f} | {draw_s * 1e3:.3f} | {bound:.2f} | "
                f"{t['noisy'] / t['torch']:.2f} |"
            )
    print(f"\n(one thread, thread CPU time; median of {repeats} interleaved samples, draws: min)")


if __name__ == "__main__":
    main()
