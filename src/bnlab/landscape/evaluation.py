"""Loss, gradient and Hessian-vector products of a model's loss, evaluated without touching it.

:class:`Objective` is what every probe measures: the loss of ``model`` at a parameter point,
averaged over one batch or the first ``num_batches`` batches of a loader (weighted by batch size,
so a loader's average equals the loss of the concatenated batch for a mean-reduced loss).
Evaluation goes through ``torch.func.functional_call`` with detached copies of the parameters
and fresh copies of the buffers for every forward pass, so:

- BN running statistics and ``num_batches_tracked`` are never updated, and every evaluation
  sees the same buffers (Batch Renormalization's output depends on them);
- ``mode="train"`` puts the whole model in training mode (BN uses batch statistics, the landscape
  SGD sees); ``mode="eval"`` in eval mode (running statistics, no dropout);
- random layers see one function per probe: noisy BN layers draw once (``frozen_noise``) and the
  global RNG is reset to the same state before every forward pass of a given batch, so dropout
  masks are the same at every point.

:func:`leave_as_found` restores what the probe may change: training flags, the global CPU (and
initialized CUDA) RNG state, parameters' ``.grad``, buffers, and the noise generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.nn import NoisyBatchNorm, frozen_noise

Batch = tuple[Any, Tensor]
"""``(inputs, targets)``; inputs is a tensor (or anything the model takes as one argument)."""
LossFn = Callable[[Any, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> scalar tensor`` (mean-reduced for loader averaging)."""
BatchOrLoader = Batch | Iterable[Batch]
Mode = Literal["train", "eval"]
Grouping = str | Mapping[str, Sequence[str]] | Callable[[str], str]
"""``"layer"`` (the module owning each parameter), ``"block"`` (the top-level child), a mapping
group -> parameter names or name prefixes, or a function parameter name -> group name."""
Params = dict[str, Tensor]
Curvature = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
"""The curvature matrix a probe measures: the Hessian H, the generalized Gauss-Newton
G = J^T H_L J (J: Jacobian of the outputs, H_L: Hessian of the loss w.r.t. the outputs), the
Monte-Carlo Fisher (labels drawn from the model's softmax) or the empirical Fisher (the true
labels): F = 1/N sum_n J_n^T r_n r_n^T J_n with r_n the gradient of sample n's loss."""
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")

__all__ = [
    "CURVATURES",
    "Batch",
    "BatchOrLoader",
    "Curvature",
    "Grouping",
    "LossFn",
    "Mode",
    "Objective",
    "RankShare",
    "across_ranks",
    "leave_as_found",
    "resolve_groups",
]


class RankShare:
    """This process's share of the data of a ``torch.distributed`` job; see :func:`across_ranks`."""

    def __init__(self, data: BatchOrLoader, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "across_ranks needs an initialized torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self.data = data
        self.group = group


def across_ranks(batch_or_loader: BatchOrLoader, group: Any = None) -> RankShare:
    """Mark ``batch_or_loader`` as this rank's share of the data: a probe given it averages its
    losses, gradients and curvature products over all ranks of ``group`` (default: the world),
    weighted by sample counts (an all-reduce per quantity), so every rank measures the landscape
    of the union of the shares and gets the same result. Every rank must call the same probe
    with the same arguments. Raises ValueError without an initialized process group."""
    return RankShare(batch_or_loader, group)


def _is_batch(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _batch_size(batch: Batch) -> int:
    inputs, targets = batch
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 0
    return int(targets.shape[0]) if targets.dim() > 0 else 0


def collect_batches(data: BatchOrLoader, num_batches: int | None) -> list[Batch]:
    """The batches a probe averages over: ``data`` itself, or the first ``num_batches`` of a loader.

    A loader is read once, so a shuffling loader still gives every evaluation the same data.
    Raises ValueError for an empty batch, an empty loader or ``num_batches < 1``.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches}")
    if _is_batch(data):
        batches = [(data[0], data[1])]  # type: ignore[index]
    else:
        batches = []
        for item in data:
            if not _is_batch(item):
                raise ValueError(
                    "batch_or_loader must be an (inputs, targets) pair or an iterable of such "
                    f"pairs, got an item of type {type(item).__name__}"
                )
            batches.append((item[0], item[1]))
            if num_batches is not None and len(batches) == num_batches:
                break
        if not batches:
            raise ValueError("batch_or_loader: the loader yielded no batches")
    for batch in batches:
        if _batch_size(batch) == 0:
            raise ValueError("batch_or_loader: got an empty batch (0 samples)")
    return batches


def resolve_groups(names: Sequence[str], groups: Grouping | None) -> dict[str, list[str]]:
    """Parameter names per group, groups in order of first appearance; ``None``: one group "all".

    Raises ValueError for an unknown grouping, a name that matches no parameter or an empty group.
    """
    if groups is None:
        return {"all": list(names)}
    resolved: dict[str, list[str]] = {}
    if isinstance(groups, str):
        if groups not in ("layer", "block"):
            raise ValueError(
                f'groups must be "layer", "block", a mapping or a callable, got {groups!r}'
            )
        for name in names:
            owner = name.rpartition(".")[0] or name if groups == "layer" else name.split(".")[0]
            resolved.setdefault(owner, []).append(name)
        return resolved
    if isinstance(groups, Mapping):
        for group, members in groups.items():
            if isinstance(members, str):
                members = [members]
            chosen = [n for n in names if any(n == m or n.startswith(m + ".") for m in members)]
            if not chosen:
                raise ValueError(
                    f"groups[{group!r}] = {list(members)} matches no trainable parameter; "
                    f"parameters are: {', '.join(names)}"
                )
            resolved[str(group)] = chosen
        return resolved
    if callable(groups):
        for name in names:
            resolved.setdefault(str(groups(name)), []).append(name)
        return resolved
    raise ValueError(
        f"groups must be a string, a mapping or a callable, got {type(groups).__name__}"
    )


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def leave_as_found(model: nn.Module) -> Iterator[None]:
    """Within the block the model may be switched between train and eval, its noisy layers draw
    once (``frozen_noise``), and the global RNG may be used; on exit the training flags, the RNG
    state (CPU, and CUDA if initialized), the parameters' ``.grad`` objects, the buffers and the
    noise generators are as they were on entry, bit for bit."""
    flags = [(m, m.training) for m in model.modules()]
    rng = _rng_state()
    grads = [(p, p.grad) for p in model.parameters()]
    # Buffers are restored only if something wrote to them, so a graph that saved them for
    # backward (a probe called between forward and backward) stays valid.
    buffers = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    try:
        with frozen_noise(model):
            yield
    finally:
        for module, training in flags:
            module.training = training
        _set_rng_state(rng)
        for p, g in grads:
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for b, version, saved in buffers:
                if b._version != version:
                    b.copy_(saved)


def _shares_statistics(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.SyncBatchNorm) or getattr(m, "sync_stats", False) for m in model.modules()
    )


def flat(tensors: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class Objective:
    """The loss of ``model`` as a function of its trainable parameters, on fixed data.

    Use inside :func:`leave_as_found` (the probes do). ``params`` holds detached copies of the
    trainable parameters (the point w); other parameters and all buffers are constants. Methods
    take parameter dicts (name -> tensor) or flat vectors over a list of names.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch_or_loader: BatchOrLoader,
        *,
        num_batches: int | None = None,
        mode: Mode = "train",
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f'mode must be "train" or "eval", got {mode!r}')
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.distributed = isinstance(batch_or_loader, RankShare)
        self.group = batch_or_loader.group if isinstance(batch_or_loader, RankShare) else None
        data = batch_or_loader.data if isinstance(batch_or_loader, RankShare) else batch_or_loader
        self.batches = collect_batches(data, num_batches)
        sizes = [_batch_size(b) for b in self.batches]
        total = float(self._reduce(torch.tensor(float(sum(sizes)), dtype=torch.float64)))
        self.weights = [s / total for s in sizes]
        self.names = [n for n, _ in named]
        self.params: Params = {n: p.detach() for n, p in named}
        self.constants: dict[str, Tensor] = {
            n: p.detach() for n, p in model.named_parameters() if not p.requires_grad
        }
        self.buffers: dict[str, Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
        # One seed per batch, drawn from the caller's RNG (restored by leave_as_found), so that
        # dropout masks are a function of the RNG state the probe was called with.
        self.seeds = [int(s) for s in torch.randint(0, 2**62, (len(self.batches),))]
        self.evaluations = 0
        self.hvps = 0
        self._hvp_cache: dict[tuple[str, ...], tuple[list[Tensor], list[Tensor]]] = {}
        model.train(mode == "train")
        if mode == "train" and any(isinstance(m, NoisyBatchNorm) for m in model.modules()):
            # Draw the frozen noise now, outside any torch.func transform: noise first drawn
            # inside one would be cached as that transform's wrapped tensors.
            with torch.no_grad():
                for i in range(len(self.batches)):
                    self.loss_on(i, {})

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def dimension(self, names: Sequence[str] | None = None) -> int:
        return sum(self.params[n].numel() for n in (names or self.names))

    def _seed(self, index: int) -> None:
        torch.default_generator.manual_seed(self.seeds[index])
        if torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                torch.cuda.default_generators[i].manual_seed(self.seeds[index])

    def _reduce(self, tensor: Tensor) -> Tensor:
        """Sum over the ranks (in place) when the data is a :class:`RankShare`; else as is."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _reduce_params(self, params: Params) -> Params:
        if self.distributed and params:
            names = list(params)
            total = self._reduce(flat(params[n] for n in names))
            params = self.unflatten(total, names)
        return params

    def outputs_on(self, index: int, params: Mapping[str, Tensor]) -> Any:
        """The model's outputs on batch ``index`` at ``params`` (missing names take the point w)."""
        inputs, _ = self.batches[index]
        state = {**self.constants, **self.params, **params}
        state.update({n: b.clone() for n, b in self.buffers.items()})
        self._seed(index)
        return functional_call(self.model, state, (inputs,))

    def loss_on(self, index: int, params: Mapping[str, Tensor]) -> Tensor:
        """The loss of batch ``index`` at ``params`` (names missing from it take the point w)."""
        outputs = self.outputs_on(index, params)
        loss = self.loss_fn(outputs, self.batches[index][1])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        self.evaluations += 1
        return loss.reshape(())

    def loss(self, params: Mapping[str, Tensor] | None = None) -> float:
        """Average loss at ``params`` (default w), without building a graph."""
        with torch.no_grad():
            total = sum(
                w * float(self.loss_on(i, params or {})) for i, w in enumerate(self.weights)
            )
        return float(self._reduce(torch.tensor(total, dtype=torch.float64)))

    def loss_and_gradient(
        self, params: Mapping[str, Tensor] | None = None, names: Sequence[str] | None = None
    ) -> tuple[float, Params]:
        """Average loss and its gradient w.r.t. ``names`` (default: all trainable parameters)."""
        names = list(names or self.names)
        point = {**self.params, **(params or {})}
        total = 0.0
        grads = {n: torch.zeros_like(point[n]) for n in names}
        for i, w in enumerate(self.weights):
            leaves = {n: point[n].detach().requires_grad_(True) for n in names}
            loss = self.loss_on(i, {**point, **leaves})
            # The weight goes into the graph, not onto the result: layers that share batch
            # statistics across ranks mix the ranks' upstream gradients in their backward.
            parts = torch.autograd.grad(w * loss, list(leaves.values()), allow_unused=True)
            for n, g in zip(names, parts, strict=True):
                if g is not None:
                    grads[n].add_(g)
            total += w * float(loss.detach())
        if self.distributed:
            total = float(self._reduce(torch.tensor(total, dtype=torch.float64)))
        return total, self._reduce_params(grads)

    def _gradient_graph(
        self, index: int, names: tuple[str, ...]
    ) -> tuple[list[Tensor], list[Tensor]]:
        leaves = [self.params[n].detach().requires_grad_(True) for n in names]
        loss = self.weights[index] * self.loss_on(index, dict(zip(names, leaves, strict=True)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        grads = tuple(
            torch.zeros_like(leaf) if g is None else g
            for leaf, g in zip(leaves, grads, strict=True)
        )
        return leaves, list(grads)

    def hvp(self, vector: Mapping[str, Tensor], names: Sequence[str] | None = None) -> Params:
        """Hessian-vector product at w by double backward: H_gg v for the group ``names``.

        With one batch the gradient's graph is built once and reused by later products; with
        several it is rebuilt per batch and product, so at most one batch's graph is alive.
        """
        names = tuple(names or self.names)
        out = {n: torch.zeros_like(self.params[n]) for n in names}
        vs = [vector[n].to(self.params[n].dtype) for n in names]
        for i in range(self.num_batches):
            if self.num_batches == 1:
                if names not in self._hvp_cache:
                    self._hvp_cache.clear()  # one group's graph alive at a time
                    self._hvp_cache[names] = self._gradient_graph(i, names)
                leaves, grads = self._hvp_cache[names]
            else:
                leaves, grads = self._gradient_graph(i, names)
            if not any(g.requires_grad for g in grads):
                continue  # the loss is linear in these parameters
            parts = torch.autograd.grad(
                [g for g in grads if g.requires_grad],
                leaves,
                grad_outputs=[v for v, g in zip(vs, grads, strict=True) if g.requires_grad],
                retain_graph=self.num_batches == 1,
                allow_unused=True,
            )
            for n, h in zip(names, parts, strict=True):
                if h is not None:
                    out[n].add_(h)
        self.hvps += 1
        return self._reduce_params(out)

    def hvp_forward(
        self, vector: Mapping[str, Tensor], names: Sequence[str] | None = None
    ) -> Params:
        """Hessian-vector product by forward-over-reverse (jvp of grad, with ``torch.func``)."""
        names = tuple(names or self.names)
        out = {n: torch.zeros_like(self.params[n]) for n in names}
        primal = {n: self.params[n] for n in names}
        tangent = {n: vector[n].to(self.params[n].dtype) for n in names}
        for i in range(self.num_batches):

            def loss_of(p: Params, index: int = i) -> Tensor:
                return self.weights[index] * self.loss_on(index, p)

            hv = torch.func.jvp(torch.func.grad(loss_of), (primal,), (tangent,))[1]
            for n in names:
                out[n].add_(hv[n])
        self.hvps += 1
        return self._reduce_params(out)

    def _jacobian_vector(
        self, index: int, names: Sequence[str], vs: Sequence[Tensor]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Leaves, outputs and J v on batch ``index``, J the Jacobian of the outputs w.r.t. the
        parameters ``names``. J v by reverse mode only: J^T u is linear in a dummy u, and its
        gradient w.r.t. u along v is J v (so every layer with a double backward works)."""
        leaves = [self.params[n].detach().requires_grad_(True) for n in names]
        outputs = self.outputs_on(index, dict(zip(names, leaves, strict=True)))
        if not isinstance(outputs, Tensor):
            raise ValueError(
                "a Gauss-Newton or Fisher operator needs a model that returns one tensor, got "
                f"{type(outputs).__name__}"
            )
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, leaves, u, create_graph=True, allow_unused=True)
        used = [(t, v) for t, v in zip(jtu, vs, strict=True) if t is not None and t.requires_grad]
        if not used:
            return leaves, outputs, torch.zeros_like(outputs)
        jv = torch.autograd.grad([t for t, _ in used], u, [v for _, v in used], retain_graph=True)[
            0
        ]
        return leaves, outputs, jv

    def output_gradients(
        self, curvature: str, generator: torch.Generator | None, samples: int
    ) -> list[Tensor]:
        """Per batch, the gradients of the loss w.r.t. the outputs at w for the labels of the
        Fisher: ``(samples, *outputs.shape)`` for ``"fisher"`` (labels drawn from
        softmax(outputs), once per probe, so the operator is one fixed matrix), ``(1, ...)`` for
        ``"empirical_fisher"`` (the true labels)."""
        if samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {samples}")
        result = []
        for i, (_, targets) in enumerate(self.batches):
            with torch.no_grad():
                outputs = self.outputs_on(i, {})
            if curvature == "empirical_fisher":
                labels = [targets]
            else:
                if not isinstance(outputs, Tensor) or outputs.dim() != 2:
                    shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else None
                    raise ValueError(
                        'operator="fisher" draws labels from softmax(outputs): it needs '
                        f"(batch, classes) logits and a cross-entropy loss, got outputs {shape}"
                    )
                probs = torch.softmax(outputs.double(), dim=1)
                labels = [
                    torch.multinomial(probs, 1, generator=generator).squeeze(1).to(targets.device)
                    for _ in range(samples)
                ]
            grads = []
            for y in labels:
                o = outputs.detach().requires_grad_(True)
                grads.append(torch.autograd.grad(self.loss_fn(o, y), o)[0])
            result.append(torch.stack(grads))
        return result

    def gauss_newton_product(
        self,
        vector: Mapping[str, Tensor],
        names: Sequence[str],
        output_gradients: list[Tensor] | None = None,
    ) -> Params:
        """G v = J^T H_L J v (``output_gradients`` None) or, with the per-batch output gradients
        G_s of :meth:`output_gradients`, the Fisher F v = N J^T mean_s[G_s <G_s, J v>_rows] (a
        mean-reduced loss has G_s = r / N, r the per-sample gradients, N the batch size)."""
        names = tuple(names)
        out = {n: torch.zeros_like(self.params[n]) for n in names}
        vs = [vector[n].to(self.params[n].dtype) for n in names]
        for i, w in enumerate(self.weights):
            leaves, outputs, jv = self._jacobian_vector(i, names, vs)
            if output_gradients is None:
                o = outputs.detach().requires_grad_(True)
                g = torch.autograd.grad(self.loss_fn(o, self.batches[i][1]), o, create_graph=True)
                if g[0].requires_grad:
                    middle = torch.autograd.grad(g[0], o, jv)[0]
                else:  # the loss is linear in the outputs
                    middle = torch.zeros_like(outputs)
            else:
                rows = output_gradients[i].reshape(output_gradients[i].shape[0], len(outputs), -1)
                along = (rows * jv.reshape(1, len(outputs), -1)).sum(-1, keepdim=True)
                middle = (len(outputs) * (rows * along).mean(0)).reshape(outputs.shape)
            parts = torch.autograd.grad(
                outputs, leaves, w * middle.to(outputs.dtype), allow_unused=True
            )
            for n, h in zip(names, parts, strict=True):
                if h is not None:
                    out[n].add_(h)
        self.hvps += 1
        return self._reduce_params(out)

    def operator(
        self,
        names: Sequence[str],
        method: str = "reverse",
        curvature: str = "hessian",
        *,
        generator: torch.Generator | None = None,
        mc_samples: int = 1,
    ) -> Callable[[Tensor], Tensor]:
        """v -> C_gg v on flat vectors over the parameters ``names`` (in that order), C the
        ``curvature`` matrix (:data:`Curvature`); ``generator`` draws the Fisher's labels.
        Raises ValueError for an unknown method or curvature, or ``method="forward"`` with a
        curvature other than the Hessian."""
        names = list(names)
        shapes = [self.params[n].shape for n in names]
        sizes = [math.prod(s) for s in shapes]
        if self.distributed and self.mode == "train" and _shares_statistics(self.model):
            raise ValueError(
                "curvature across ranks through normalization layers whose training statistics "
                "span the ranks (bnlab BN with sync_stats=True, SyncBatchNorm) is not supported: "
                "their double backward is per rank; use sync_stats=False or mode='eval'"
            )
        if method not in ("reverse", "forward"):
            raise ValueError(f'method must be "reverse" or "forward", got {method!r}')
        if curvature not in CURVATURES:
            raise ValueError(
                f"operator must be one of {', '.join(map(repr, CURVATURES))}, got {curvature!r}"
            )
        product: Callable[[Mapping[str, Tensor], Sequence[str]], Params]
        if curvature == "hessian":
            product = self.hvp if method == "reverse" else self.hvp_forward
        elif method != "reverse":
            raise ValueError(
                f'method="forward" applies to operator="hessian" only, not {curvature!r}'
            )
        else:
            fisher = (
                None
                if curvature == "ggn"
                else self.output_gradients(curvature, generator, mc_samples)
            )

            def product(vector: Mapping[str, Tensor], names: Sequence[str]) -> Params:
                return self.gauss_newton_product(vector, names, fisher)

        def apply(v: Tensor) -> Tensor:
            parts = torch.split(v, sizes)
            vector = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
            hv = product(vector, names)
            return flat(hv[n] for n in names)

        return apply

    def vector(
        self, vector: Mapping[str, Tensor] | Tensor, argument: str, *, complete: bool
    ) -> Params:
        """A vector over all trainable parameters from a flat tensor (their total size, in
        order) or a dict name -> tensor, in the parameters' dtype. With ``complete`` every name
        must be present, otherwise missing ones are zero. Raises ValueError naming ``argument``
        for a wrong size, unknown names or wrong shapes."""
        if isinstance(vector, Tensor):
            if vector.numel() != self.dimension():
                raise ValueError(
                    f"{argument} has {vector.numel()} entries, the model has "
                    f"{self.dimension()} trainable parameters"
                )
            vector = self.unflatten(vector.reshape(-1), self.names)
        unknown = [n for n in vector if n not in self.params]
        missing = [n for n in self.names if n not in vector] if complete else []
        wrong = [n for n in vector if n in self.params and vector[n].shape != self.params[n].shape]
        if unknown or missing or wrong:
            raise ValueError(
                f"{argument} must map trainable parameter names to tensors of their shapes; "
                f"unknown names: {unknown}, missing: {missing}, wrong shapes: {wrong}"
            )
        return {
            n: vector[n].to(p) if n in vector else torch.zeros_like(p)
            for n, p in self.params.items()
        }

    def unflatten(self, v: Tensor, names: Sequence[str]) -> Params:
        sizes = [self.params[n].numel() for n in names]
        return {
            n: p.reshape(self.params[n].shape)
            for n, p in zip(names, torch.split(v, sizes), strict=True)
        }
