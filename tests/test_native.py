"""The native (C++) glue of the kernels: built where a compiler is, same numbers as the Python
Function and torch.nn, and a clean fallback where it is off or cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import bnlab.functional as F
import bnlab.nn as bnn
from bnlab.functional import kernels, ops
from bnlab.functional.kernels import native
from bnlab.functional.noise import seed_key, step_key
from helpers import rel_err

pytestmark = pytest.mark.skipif(not kernels.numba_available(), reason="numba not installed")


def _has_toolchain() -> bool:
    """A C++ compiler, ninja and Python's headers: what torch's extension builder needs."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    return shutil.which("ninja") is not None and compiler is not None and headers.exists()


@pytest.mark.skipif(not _has_toolchain(), reason="no C++ compiler, ninja or Python headers")
def test_glue_is_built_where_a_compiler_and_ninja_exist():
    built, why = native.status()
    assert built, why
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    y = bnn.BatchNorm2d(3)(x)
    assert y.grad_fn.name() == native.NODE_NAME


def test_bnlab_native_0_runs_the_python_function():
    code = (
        "import torch, bnlab.nn as bnn; from bnlab.functional.kernels import native; "
        "y = bnn.BatchNorm2d(3)(torch.randn(8, 3, 4, 4, requires_grad=True)); "
        "print(type(y.grad_fn).__name__, native.status())"
    )
    env = dict(os.environ, BNLAB_NATIVE="0")
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    assert out.stdout.split()[0] == "FusedTrainNormBackward"
    assert "turned off by BNLAB_NATIVE=0" in out.stdout


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="could not be built.*no C\\+\\+ compiler"):
        y, _ = F.normalize_train(x, None, None, ops.NormSpec(1e-5))
    assert type(y.grad_fn).__name__ == "FusedTrainNormBackward"
    assert native.status() == (False, "OSError: no C++ compiler found")
    y2, _ = F.normalize_train(x, None, None, ops.NormSpec(1e-5))  # no second warning
    assert torch.equal(y, y2)


needs_glue = pytest.mark.skipif(
    not _has_toolchain() or native.active() is None, reason="native glue not built"
)


def _modules(channels: int, **kwargs):
    torch.manual_seed(0)
    ours, theirs = bnn.BatchNorm2d(channels, **kwargs), torch.nn.BatchNorm2d(channels, **kwargs)
    if ours.affine:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2.0, channels))
                m.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return ours, theirs


@needs_glue
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_steps_match_torch_nn(kwargs, channels_last):
    """Three training steps and an eval step: outputs, all gradients, running buffers."""
    ours, theirs = _modules(5, dtype=torch.float64, **kwargs)
    for step in range(3):
        x = torch.randn(6, 5, 3, 4, dtype=torch.float64) * 4 + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for m in (ours, theirs):
            xs = x.clone().requires_grad_()
            y = m(xs)
            params = [xs, *m.parameters()]
            outs.append((y, *torch.autograd.grad((y * y.detach().cos()).sum(), params)))
        assert outs[0][0].grad_fn.name() == native.NODE_NAME
        for a, b in zip(*outs, strict=True):
            assert rel_err(a, b) <= 1e-10
        for name, buffer in theirs.named_buffers():
            assert torch.allclose(getattr(ours, name), buffer, rtol=1e-12, atol=1e-14), name
    ours.eval(), theirs.eval()
    x = torch.randn(6, 5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= 1e-10


@needs_glue
def test_gradient_with_other_strides_and_partial_needs():
    """dy in another layout than x (copied to x's), and gradients wanted for some inputs only."""
    x = torch.randn(8, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    dy = torch.randn(8, 4, 5, 5)  # NCHW
    results = []
    for enabled in (True, False):
        with F.use_kernels(enabled):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            y, _ = F.normalize_train(xs, ws, bs, ops.NormSpec(1e-5))
            full = torch.autograd.grad(y, (xs, ws, bs), dy, retain_graph=True)
            only_w = torch.autograd.grad(y, (ws,), dy, retain_graph=True)
            only_b = torch.autograd.grad(y, (bs,), dy)
            results.append((y, *full, *only_w, *only_b))
        if enabled:
            assert y.grad_fn.name() == native.NODE_NAME
    for a, b_ in zip(*results, strict=True):
        assert rel_err(a, b_) <= 1e-5


@needs_glue
def test_parameters_in_another_dtype_take_the_python_function():
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with F.use_kernels(True):
        y, _ = F.normalize_train(x, w, None, ops.NormSpec(1e-5))
    assert type(y.grad_fn).__name__ == "FusedTrainNormBackward"
    (dw,) = torch.autograd.grad(y.sum() + (y * y).sum(), (w,))
    assert dw.dtype == torch.float64


@needs_glue
def test_node_releases_its_saved_tensors_after_backward():
    """Like torch's own nodes: a second backward without retain_graph is an error, and with
    retain_graph both backwards give the same gradient."""
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    y = bnn.BatchNorm2d(3)(x)
    assert y.grad_fn.name() == native.NODE_NAME
    (first,) = torch.autograd.grad((y * y).sum(), x, retain_graph=True)
    (second,) = torch.autograd.grad((y * y).sum(), x)
    assert torch.equal(first, second)
    z = bnn.BatchNorm2d(3)(x)
    z.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        z.sum().backward()


@needs_glue
def test_which_modules_take_the_glue():
    """BatchNorm, lp (each p), ghost batches and noise run on the glue; renorm on the Python
    Function (its running-statistics correction is not in the glue's entries)."""
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    native_layers = [
        bnn.BatchNorm2d(3), bnn.GhostBatchNorm2d(3, virtual_batch_size=4),
        *(bnn.LpBatchNorm2d(3, p=p) for p in (1, 2, float("inf"))), bnn.NoisyBatchNorm2d(3),
    ]  # fmt: skip
    for layer in native_layers:
        assert layer(x).grad_fn.name() == native.NODE_NAME, layer
    layer = bnn.BatchRenorm2d(3)
    assert type(layer(x).grad_fn).__name__ == "FusedTrainNormBackward", layer


@needs_glue
def test_parameters_off_the_cpu_are_refused_by_name():
    x = torch.randn(8, 3, 4, 4)
    weight = torch.ones(3, device="meta")
    with pytest.raises(
        RuntimeError, match="expected weight on the CPU like the input, got it on meta"
    ):
        F.batch_norm(x, None, None, weight, None, training=True)


@needs_glue
def test_noise_keys_drawn_through_the_glue_equal_the_tensor_draw():
    """A noisy layer's key comes from the glue when it is loaded and from a tensor's random_
    otherwise: the same values and the same generator states either way, explicit generator
    or the global one."""
    from bnlab.functional import noise

    native.load()
    spec = F.NoiseSpec()
    cpu = torch.device("cpu")
    for seeded in (True, False):
        draws = []
        for glue in (True, False):
            torch.manual_seed(11)
            g = torch.Generator().manual_seed(11) if seeded else None
            with nullcontext() if glue else native.disabled():
                assert (native.loaded() is not None) == glue
                keys = [noise.draw(spec, cpu, g).key for _ in range(4)]
            after = (g if seeded else torch.default_generator).get_state()
            draws.append((keys, after))
        assert draws[0][0] == draws[1][0]
        assert torch.equal(draws[0][1], draws[1][1])
        assert len(set(draws[0][0])) == 4


@pytest.fixture
def cache_limit():
    """Restores the output cache's limit (and empties it) after the test."""
    _, limit = native.output_cache()
    native.output_cache(0)
    yield
    native.output_cache(0)
    native.output_cache(limit)


@needs_glue
@pytest.mark.parametrize("channels_last", [False, True])
def test_freed_large_outputs_are_reused_within_the_cache_limit(channels_last, cache_limit):
    """A freed y of >= 4 MiB goes to the cache and the next output of its size reuses the block
    (same address, strides of the new input, torch.nn's numbers); past the limit the least
    recently freed block is released; limit 0 releases everything; small outputs never enter;
    an output can grow (resize_) as torch's own can.
    Numbers against torch.nn in float64 (torch's float32 channels-last statistics are off by
    about 1e-5 here, ours by 1e-7)."""
    torch.manual_seed(8)
    x = torch.randn(64, 8, 48, 48) * 3 + 2  # 4.7 MB of float32
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    nbytes = x.numel() * 4
    native.output_cache(3 * nbytes // 2)  # room for one block
    layer, reference = bnn.BatchNorm2d(8), torch.nn.BatchNorm2d(8).double()
    y = layer(x)
    first = y.data_ptr()
    assert native.output_cache()[0] == 0
    del y
    assert native.output_cache()[0] == nbytes
    again, other = layer(x), layer(x)
    assert again.data_ptr() == first and other.data_ptr() != first
    assert native.output_cache()[0] == 0
    assert again.stride() == x.stride() and rel_err(again, reference(x.double())) <= 1e-6
    del again, other  # two blocks, room for one: the first freed is released
    assert native.output_cache() == (nbytes, 3 * nbytes // 2)
    assert layer(x).data_ptr() != first  # (the kept block, freed again right away)
    small = layer(torch.randn(8, 8, 4, 4))
    del small
    assert native.output_cache() == (nbytes, 3 * nbytes // 2)
    grown = layer(x).detach()  # resizable like torch's outputs: growing copies, frees the block
    kept = grown.clone()
    grown.resize_(65, *x.shape[1:])
    memory = (x.numel(),), (1,)  # both in memory order (resize_ keeps the bytes)
    assert torch.equal(grown.as_strided(*memory), kept.as_strided(*memory))
    assert native.output_cache()[0] == nbytes
    assert native.output_cache(0) == (0, 0)
    with pytest.raises(ValueError, match="output cache limit must be >= 0 bytes"):
        native.output_cache(-1)


@needs_glue
def test_outputs_freed_on_other_threads_and_in_a_forked_child(cache_limit):
    """The cache is shared by threads (outputs made and freed on four at once keep float64
    torch.nn's numbers and the limit), and a child forked while it holds blocks can use it."""
    from concurrent.futures import ThreadPoolExecutor

    native.output_cache(64 * 2**20)
    torch.manual_seed(9)
    x = torch.randn(64, 8, 48, 48, requires_grad=True)
    dy = torch.randn_like(x)
    x64 = x.detach().double().requires_grad_()
    want_y = torch.nn.BatchNorm2d(8).double()(x64)
    (want_dx,) = torch.autograd.grad(want_y, x64, dy.double())

    def step(_: int) -> float:
        y = bnn.BatchNorm2d(8)(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        return max(rel_err(y, want_y), rel_err(dx, want_dx))

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(step, range(24)))
    assert max(errors) <= 1e-6
    held, limit = native.output_cache()
    assert 0 < held <= limit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one step on the inherited cache, then report and leave
        try:
            os.write(write, b"ok" if step(0) <= 1e-6 else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 8) == b"ok" and status == 0


def test_cache_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("BNLAB_OUTPUT_CACHE_MB", "1.5")
    assert native._cache_limit_from_environment() == 3 * 2**19
    for bad in ("lots", "-2", "nan"):
        monkeypatch.setenv("BNLAB_OUTPUT_CACHE_MB", bad)
        with pytest.raises(ValueError, match="BNLAB_OUTPUT_CACHE_MB must be a number of MiB"):
            native._cache_limit_from_environment()
    monkeypatch.delenv("BNLAB_OUTPUT_CACHE_MB")
    assert native._cache_limit_from_environment() is None


def test_a_bad_cache_limit_stops_the_load_every_time(monkeypatch):
    """A bad BNLAB_OUTPUT_CACHE_MB is refused before the glue is built, on every load: never a
    glue loaded once with the error and silently without the setting afterwards."""
    from torch.utils import cpp_extension

    def must_not_build(**kwargs):
        raise AssertionError("built despite a bad BNLAB_OUTPUT_CACHE_MB")

    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    monkeypatch.setenv("BNLAB_OUTPUT_CACHE_MB", "lots")
    for _ in range(2):
        with pytest.raises(ValueError, match="BNLAB_OUTPUT_CACHE_MB must be a number of MiB"):
            native.load()
    assert native._state is None


@needs_glue
def test_the_batch_counter_moves_as_add_does():
    """num_batches_tracked goes up through the glue as through add_(1): value and version
    counter; what the glue does not handle itself (another dtype, an inference tensor outside
    inference mode) gets add_'s own result or error. A module counts as torch.nn does."""
    glue = native.loaded()
    counter = torch.tensor(5, dtype=torch.long)
    version = counter._version
    glue.count_batch(counter)
    assert counter.item() == 6 and counter._version == version + 1
    other = torch.tensor(5, dtype=torch.int32)
    glue.count_batch(other)
    assert other.item() == 6 and other.dtype == torch.int32
    with torch.inference_mode():
        frozen = torch.tensor(0, dtype=torch.long)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        glue.count_batch(frozen)
    ours, reference = bnn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4)
        ours(x), reference(x)
    assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item() == 3
    assert rel_err(ours.running_mean, reference.running_mean) <= 1e-6


@needs_glue
@pytest.mark.parametrize("step", [0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**62 - 2])
def test_the_next_noise_key_is_step_key_of_the_buffers(step):
    """The glue's next key equals noise.step_key of the base key and the step (across the
    counter's 32-bit wrap, 2 step >= 2^32), and moves the step counter as add_(1) does; buffers
    it does not take (another dtype, a key word past 32 bits, an inference tensor) get -1 and
    are left as they were. A layer draws the same keys through the glue as through Python."""
    glue = native.loaded()
    base = torch.tensor(seed_key(7), dtype=torch.int64)
    steps = torch.tensor(step, dtype=torch.int64)
    version = steps._version
    packed = glue.next_noise_key(base, steps)
    low, high = step_key(tuple(base.tolist()), step)
    assert packed == low | (high << 32)
    assert steps.item() == step + 1 and steps._version == version + 1
    with torch.inference_mode():
        frozen = torch.tensor(step, dtype=torch.int64)
    for key, counter in (
        (base, torch.tensor(5, dtype=torch.int32)),
        (torch.tensor([2**32, 1], dtype=torch.int64), steps),
        (torch.tensor([1, -1], dtype=torch.int64), steps),
        (base, frozen),
    ):
        before = counter.item()
        assert glue.next_noise_key(key, counter) == -1 and counter.item() == before
    layers = [bnn.NoisyBatchNorm2d(3, seed=11) for _ in range(2)]
    x = torch.randn(4, 3, 2, 2)
    with native.disabled():
        python_keys = [layers[0]._next_draw().key for _ in range(3)]
    assert [layers[1]._next_draw().key for _ in range(3)] == python_keys
    assert layers[0].noise_steps.item() == layers[1].noise_steps.item() == 3
    torch.testing.assert_close(layers[0](x), layers[1](x), rtol=0, atol=0)


def test_each_checkout_builds_its_glue_in_a_folder_of_its_own(monkeypatch, tmp_path):
    # one shared name made two checkouts on one machine rebuild each other's glue on import and
    # wait on each other's build lock (seen with git worktrees: minutes per test)
    here = native.extension_name()
    assert here == native.extension_name() and here.isidentifier()
    monkeypatch.setattr(native, "SOURCE", tmp_path / "other" / "native.cpp")
    assert native.extension_name() != here
