"""The training loop: ``train(config, run_dir)``.

One step t (1-based) = the probes due at t (on the pre-update weights), forward and backward on
batch t, a divergence check, the optimizer and scheduler update, the step's metric rows, and
(every ``checkpoint.every`` steps) a checkpoint. Batch t is a pure function of (seed, t), and the
checkpoint holds every other piece of state, so a resumed run repeats an uninterrupted one bit
for bit on CPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import random
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from bnlab.data import DataFileError, Dataset, load_dataset
from bnlab.models import build_model
from bnlab.train.checkpoint import load_latest, save_checkpoint
from bnlab.train.config import ConfigError, TrainConfig, config_from_dict, to_toml, tomllib
from bnlab.train.faults import kill_point
from bnlab.train.lock import RunLock, RunLockedError
from bnlab.train.probes import LossFn, ProbeContext, ProbeHook, make_probe
from bnlab.train.schedule import build_scheduler
from bnlab.train.store import (
    FINAL_STATES,
    RunStore,
    RunStoreWarning,
    read_status,
    status_damage,
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RunResult:
    """How a run ended: ``state`` (finished, diverged; in a sweep also failed, or locked: held
    by another process and skipped), the last ``step``, its directory and, for failed and
    locked runs, the ``reason``."""

    run_dir: Path
    state: str
    step: int
    reason: str = ""


class BatchOrder:
    """The samples of each step's batch: epoch e shuffles with ``DistributedSampler``'s rule
    (a permutation seeded by seed + e), rank r of W takes every W-th index, so the W per-rank
    batches of step t together are the single-process batch t. Incomplete batches are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ConfigError(
                "data.batch_size",
                f"must be divisible by the number of processes ({world}), got {batch_size}",
            )
        self.local_batch = batch_size // world
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batches_per_epoch = len(self.sampler) // self.local_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                "data.batch_size", f"is larger than the training set ({n} samples): {batch_size}"
            )
        self._epoch = -1
        self._indices = torch.empty(0, dtype=torch.long)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of step ``step`` (1-based)."""
        return divmod(step - 1, self.batches_per_epoch)

    def indices(self, step: int) -> Tensor:
        epoch, batch = self.position(step)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._indices = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
            self._epoch = epoch
        return self._indices[batch * self.local_batch : (batch + 1) * self.local_batch]


def _loss_fn(config: TrainConfig, dataset: Dataset) -> LossFn:
    kind = config.loss
    if kind == "auto":
        kind = "cross_entropy" if dataset.task == "classification" else "mse"
    if kind == "cross_entropy" and dataset.task != "classification":
        raise ConfigError("loss", f"cross_entropy needs class labels; {dataset.name} is regression")
    if kind == "mse" and dataset.task != "regression":
        raise ConfigError("loss", f"mse needs regression targets; {dataset.name} has class labels")
    function: LossFn = (
        nn.functional.cross_entropy if kind == "cross_entropy" else nn.functional.mse_loss
    )
    return function


def build_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """``torch.optim.<optim.name>`` with lr, momentum and weight decay where it takes them."""
    optim = config.optim
    cls = getattr(torch.optim, optim.name)
    accepted = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"lr": optim.lr}
    if "momentum" in accepted:
        kwargs["momentum"] = optim.momentum
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = optim.weight_decay
    kwargs.update(optim.options)  # names checked by the config's validation
    try:
        optimizer: torch.optim.Optimizer = cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            "optim", f"torch.optim.{optim.name} rejected {kwargs}: {error}"
        ) from error
    return optimizer


def _rng_state() -> dict[str, Any]:
    # The legacy global NumPy RNG is saved because user code and probes may draw from it.
    np_state: Any = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(gauss)))  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Whatever a probe does, the model's mode, buffers, noise generators and the global RNG
    come back as they were; in a distributed run its norm layers keep statistics local."""
    modes = [m.training for m in model.modules()]
    buffers = [b.detach().clone() for b in model.buffers()]
    # extra state (a module's get_extra_state, if any) restored module by module: a partial
    # load_state_dict would let BN's legacy-checkpoint rule reset num_batches_tracked
    stateful = [m for m in model.modules() if _has_extra_state(m)]
    extra = [m.get_extra_state() for m in stateful]
    synced: list[Any] = [m for m in model.modules() if getattr(m, "sync_stats", False)]
    rng = _rng_state()
    for m in synced:
        m.sync_stats = False
    try:
        yield
    finally:
        for m in synced:
            m.sync_stats = True
        _set_rng_state(rng)
        with torch.no_grad():
            for saved, b in zip(buffers, model.buffers(), strict=True):
                b.copy_(saved)
        for m, state in zip(stateful, extra, strict=True):
            m.set_extra_state(state)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def set_threads(threads: int) -> None:
    """Pin torch's and numba's CPU thread counts: bnlab's numba kernels split reductions by
    thread count, so bitwise reproducibility needs the same count on every (re)start."""
    torch.set_num_threads(threads)
    if importlib.util.find_spec("numba") is not None:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def _distributed_setup(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank): joins the process group torchrun describes in the
    environment (gloo on CPU, nccl on CUDA), or (0, 1, 0) for a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    # torch._dynamo, imported lazily by DDP and the optimizers, keeps ten references to the
    # default process group when it is first imported after init_process_group (torch 2.13);
    # destroy_process_group then cannot free the gloo backend, whose threads (gloo_tcp_loop,
    # pt_gloo_runloop) run on into interpreter teardown, where a rank now and then aborted
    # ("terminate called without an active exception"). Imported first, it holds none.
    import torch._dynamo  # noqa: F401

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available on this machine; allowed values: cpu")
    if config.device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(config.device)


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, batch_size: int
) -> dict[str, float]:
    """Mean loss (and accuracy for class labels) of ``model`` in eval mode over (x, y)."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    classification = not y.is_floating_point()
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total += float(loss_fn(out, target).double()) * len(target)
        if classification:
            correct += int((out.argmax(dim=1) == target).sum())
    model.train(was_training)
    result = {"loss": total / len(x)}
    if classification:
        result["accuracy"] = correct / len(x)
    return result


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(before: str, after: str) -> str:
    """The keys on which two configs' TOML texts differ: ``optim.lr 0.1 -> 0.5, ...``."""
    old, new = _flatten(tomllib.loads(before)), _flatten(tomllib.loads(after))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "-") != new.get(k, "-"))
    shown = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _check_run_dir(
    store: RunStore, config_text: str, latest: tuple[int, dict[str, Any]] | None
) -> None:
    """Refuse to mix two configurations in one run: the config the run's newest checkpoint
    was trained with (or, before any, its config.toml) must be ``config_text``. A config.toml
    edited after the run started is refused, or restored when the checkpoint matches."""
    trained = latest[1].get("config") if latest is not None else None
    existing = store.read_config_text()
    if trained is None and existing is not None:  # no record but the file (older checkpoints)
        try:
            same = config_from_dict(tomllib.loads(existing)) == config_from_dict(
                tomllib.loads(config_text)
            )
        except (tomllib.TOMLDecodeError, ConfigError) as error:
            if latest is not None:
                raise ConfigError(
                    "run_dir",
                    f"{store.root / 'config.toml'} is damaged ({error}) and the run's "
                    "checkpoints do not record their config; restore the file to resume",
                ) from error
            warnings.warn(  # nothing trained yet to mix with
                f"{store.root / 'config.toml'} is damaged ({error}); rewritten",
                RunStoreWarning,
                stacklevel=3,
            )
            return
        if not same:
            raise ConfigError(
                "run_dir",
                f"{store.root} holds a run of a different config; resume it with its own "
                "config.toml or choose another run directory",
            )
        return
    if trained is not None and trained != config_text:
        raise ConfigError(
            "run_dir",
            f"{store.root} holds a run of a different config: its checkpoint of step "
            f"{latest[0] if latest else 0} was trained with {_differences(trained, config_text)}"
            "; resume it with that config (restore its config.toml, or --set the old values) "
            "or train this one in another run directory",
        )
    if trained is not None and existing is not None and existing != trained:
        warnings.warn(
            f"{store.root / 'config.toml'} was edited after the run started; restored to the "
            "config its checkpoints were trained with",
            RunStoreWarning,
            stacklevel=3,
        )


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    hooks: Sequence[ProbeHook] = (),
    progress: bool | Progress = True,
) -> RunResult:
    """Train ``config`` into ``run_dir``, resuming from its newest good checkpoint.

    ``hooks``: extra probe hooks besides ``config.probes``. ``progress``: a tqdm bar (True),
    none (False), or a callback ``(step, total)``. Under torchrun (WORLD_SIZE > 1) every process
    calls this; rank 0 writes the run directory. A finished or diverged run returns at once.

    Returns the RunResult. A config whose data, model, optimizer or probes cannot be built
    (ConfigError, DataFileError) raises before anything is written; so does a run directory
    that holds another config (ConfigError) or that another process is writing
    (RunLockedError). Errors during the run mark it ``failed``, write ``traceback.txt`` and
    propagate.
    """
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status is not None and status["state"] in FINAL_STATES:
        return RunResult(run_dir, status["state"], int(status["step"]))
    rank, world, local_rank = _distributed_setup(config.device)
    device = _device(config, local_rank)
    config_text = to_toml(config)
    # data, model, optimizer and probes first: a config that cannot run writes nothing
    session = _Session.build(config, RunStore(run_dir, writer=False), device, rank, world, hooks)
    with _writer_lock(run_dir, rank, world):
        status = read_status(run_dir)  # a writer that held the lock may just have finished
        if status is not None and status["state"] in FINAL_STATES:
            return RunResult(run_dir, status["state"], int(status["step"]))
        store = session.store = RunStore(run_dir, writer=rank == 0)
        latest = load_latest(store.checkpoints, warn=rank == 0)
        _check_run_dir(store, config_text, latest)
        damage = status_damage(run_dir)
        if damage and rank == 0:
            warnings.warn(
                f"{store.status_path} is damaged ({damage}); rebuilt from the newest checkpoint",
                RunStoreWarning,
                stacklevel=2,
            )
        store.write_config(config_text)
        try:
            return session.run(progress, latest)
        except Exception as error:
            _record_failure(store, error)
            raise
        finally:
            store.close()


def _record_failure(store: RunStore, error: Exception) -> None:
    """Mark the run ``failed`` at its last recorded step with the error, and keep the
    traceback where the disk allows; the error itself is the caller's to raise."""
    store.close()  # a metrics file that failed mid-row goes first
    last = read_status(store.root)
    step = int(last["step"]) if last else 0
    try:
        store.set_status("failed", step, error=f"{type(error).__name__}: {error}")
        store.write_traceback(traceback.format_exc())
    except OSError:  # a full disk: the error still propagates, and the run resumes
        pass


@contextmanager
def _writer_lock(run_dir: Path, rank: int, world: int) -> Iterator[None]:
    """The run directory's lock, held by rank 0 (the writer) for the run's life; every rank
    raises RunLockedError when another process holds it, before anything is written."""
    lock = RunLock(run_dir)
    holder: tuple[str, int] | None = None
    if rank == 0:
        try:
            lock.acquire()
        except RunLockedError as error:
            holder = (error.host, error.pid)
    if world > 1:
        shared: list[Any] = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise RunLockedError(run_dir, *holder)
    try:
        yield
    finally:
        lock.release()


def _seed_everything(config: TrainConfig, device: torch.device) -> None:
    if config.threads:
        set_threads(config.threads)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002
    torch.manual_seed(config.seed)


def _load_data(config: TrainConfig) -> Dataset:
    data = config.data
    try:
        dataset = load_dataset(
            data.spec,
            seed=data.split_seed,
            test_fraction=data.test_fraction,
            standardize=data.standardize,
            **data.options,
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, (ConfigError, DataFileError)):
            raise
        raise ConfigError("data.options", str(error).splitlines()[0]) from error
    if len(dataset.x_test) == 0:
        raise ConfigError(
            "data.test_fraction",
            f"{data.test_fraction} leaves no test samples of {dataset.name} "
            f"({len(dataset.x_train)} samples in all)",
        )
    return dataset


def _build_model(config: TrainConfig, dataset: Dataset, device: torch.device) -> nn.Module:
    spec = config.model
    try:
        return build_model(
            spec.name,
            dataset.input_shape,
            dataset.num_outputs,
            norm=spec.norm,
            norm_options=spec.norm_options,
            init_scale=spec.init_scale,
            seed=config.seed,
            **spec.options,
        ).to(device)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            "model", f"cannot build {spec.name!r} for {dataset.name}: {error}"
        ) from error


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    # The norm layers reduce their statistics over all ranks, so running buffers agree without
    # DDP's per-forward broadcast.
    accepted = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in accepted
        else {"broadcast_buffers": False}
    )
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
    )


@dataclass
class _Session:
    """One process's share of a run: data on the device, the model (``net`` wraps it in DDP
    when there are several processes), optimizer, scheduler, probes and the store."""

    config: TrainConfig
    store: RunStore
    rank: int
    world: int
    dataset: Dataset
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    order: BatchOrder
    loss_fn: LossFn
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    hooks: list[ProbeHook]

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        store: RunStore,
        device: torch.device,
        rank: int,
        world: int,
        hooks: Sequence[ProbeHook],
    ) -> _Session:
        _seed_everything(config, device)
        dataset = _load_data(config)
        model = _build_model(config, dataset, device)
        optimizer = build_optimizer(config, model.parameters())
        return cls(
            config=config,
            store=store,
            rank=rank,
            world=world,
            dataset=dataset,
            x_train=dataset.x_train.to(device),
            y_train=dataset.y_train.to(device),
            x_test=dataset.x_test.to(device),
            y_test=dataset.y_test.to(device),
            order=BatchOrder(
                len(dataset.x_train), config.data.batch_size, config.seed, rank, world
            ),
            loss_fn=_loss_fn(config, dataset),
            model=model,
            net=_data_parallel(model, device) if world > 1 else model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config.schedule, config.optim.lr, config.steps),
            hooks=[make_probe(p.name, p.every, p.options) for p in config.probes] + list(hooks),
        )

    def resume(self, latest: tuple[int, dict[str, Any]] | None) -> int:
        """Load ``latest`` (the newest good checkpoint, if any), drop the metric rows after it,
        and return its step (0 for a fresh start)."""
        start = 0
        if latest is not None:
            start, state = latest
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
        self.store.truncate_metrics(start if latest is not None else -1)
        self.store.write_env(
            self.config.seed,
            str(self.x_train.device),
            self.world,
            {"resumed_from": start, "dataset": self.dataset.name},
        )
        self.store.set_status("running", start)
        return start

    def run(
        self, progress: bool | Progress, latest: tuple[int, dict[str, Any]] | None
    ) -> RunResult:
        config, store = self.config, self.store
        start = self.resume(latest)
        bar = None
        report: Progress | None = progress if callable(progress) else None
        if progress is True and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=start, desc=store.root.name, leave=False)
        if start == 0 and config.eval_every:
            self.evaluate(0)
        try:
            for step in range(start + 1, config.steps + 1):
                if not self.step(step):
                    return RunResult(store.root, "diverged", step)
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    self.evaluate(step)
                if step % config.checkpoint.every == 0 or step == config.steps:
                    self.checkpoint(step)
                if bar is not None:
                    bar.update(1)
                if report is not None:
                    report(step, config.steps)
        finally:
            if bar is not None:
                bar.close()
        store.set_status("finished", config.steps)
        return RunResult(store.root, "finished", config.steps)

    def step(self, step: int) -> bool:
        """Probes, then one update on batch ``step``; False (run diverged) on a non-finite loss."""
        idx = self.order.indices(step)
        x, y = self.x_train[idx], self.y_train[idx]
        due = [h for h in self.hooks if h.due(step)]
        if due and self.rank == 0:
            self.model.train()
            context = ProbeContext(self.model, self.loss_fn, (x, y), self.optimizer, step)
            for hook in due:
                with _untouched(self.model):
                    values = hook(context)
                self.store.append(step, "probe", probe=hook.name, **values)

        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        kill_point("step", step, fire=True)
        lr = self.optimizer.param_groups[0]["lr"]
        stats = _batch_stats(loss, out, y, self.world)
        if not math.isfinite(stats["loss"]):
            self.store.append(step, "train", lr=lr, **stats)
            self.store.set_status("diverged", step, reason=f"loss is {stats['loss']}")
            return False
        self.optimizer.step()
        self.scheduler.step()
        if step % self.config.log_every == 0 or step == self.config.steps:
            self.store.append(step, "train", lr=lr, **stats)
        return True

    def evaluate(self, step: int) -> None:
        """An "eval" row for the test split (rank 0; eval mode needs no other rank)."""
        if self.rank == 0:
            values = evaluate(
                self.model, self.loss_fn, self.x_test, self.y_test, self.config.data.eval_batch_size
            )
            self.store.append(step, "eval", split="test", **values)

    def checkpoint(self, step: int) -> None:
        """Rank 0 makes the rows so far durable, then writes the checkpoint of ``step``."""
        if self.rank != 0:
            return
        self.store.sync()
        epoch, batch = self.order.position(step + 1)
        state = {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "config": to_toml(self.config),  # a resume under an edited config is refused
            "data_order": {"seed": self.config.seed, "next_epoch": epoch, "next_batch": batch},
        }
        save_checkpoint(self.store.checkpoints, step, state, keep=self.config.checkpoint.keep)
        self.store.set_status("running", step)
        kill_point("after_checkpoint", step, fire=True)


def _batch_stats(loss: Tensor, out: Tensor, y: Tensor, world: int) -> dict[str, float]:
    """The step's loss (and accuracy) over the global batch: per-rank sums are all-reduced."""
    n = len(y)
    values = [loss.detach().double() * n, torch.tensor(float(n), dtype=torch.float64)]
    classification = not y.is_floating_point()
    if classification:
        values.append((out.detach().argmax(dim=1) == y).sum().double())
    packed = torch.stack([v.to(loss.device) for v in values])
    if world > 1:
        dist.all_reduce(packed)
    totals = packed.tolist()
    stats = {"loss": totals[0] / totals[1]}
    if classification:
        stats["accuracy"] = totals[2] / totals[1]
    return stats
