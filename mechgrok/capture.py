"""Hook-based activation capture, in memory or streamed to disk.

``capture(model, inputs, hooks)`` runs ``model`` over ``inputs`` in batches and keeps the outputs
of the named hooks, ``[N, ...]`` each, as an ``ActivationCache``. Three backends give the same
numbers (the tests check it); by default (``backend=None``) a ``HookedRootModule`` uses
``"transformer_lens"`` and any other ``nn.Module`` ``"torch"``:

- ``"transformer_lens"``: transformer-lens forward hooks on ``HookPoint`` s, installed
  once with ``model.hooks(...)`` for the whole run. Needs a ``HookedRootModule``.
- ``"torch"``: ``register_forward_hook`` on the named submodules of any ``nn.Module`` (a raw
  Hugging Face model, a TransformerBridge, an ``nn.Sequential``). Only the hooks' outputs are kept:
  the forward's own return value (a Hugging Face output object, say) is ignored.
- ``"nnsight"``: an ``nnsight.NNsight`` trace per batch that reads ``.output`` of the named
  modules in execution order (nnsight 0.8 requires that order; a one-example dry run finds it).

Hook names are module paths (``blocks.0.mlp.hook_post``, ``transformer.h.0.mlp``); for a
``HookedRootModule`` every hook point is also a module, so all backends accept its hook names.
A module that returns a tuple (a Hugging Face block, for instance) is captured as element 0; a
module called several times in one forward is captured at its first call. A wrong name fails before
the model runs, with the closest module paths (``did you mean 'transformer.h.0.mlp'?``).

With ``out=PATH`` each hook streams into a standard ``.npy`` file (``numpy.lib.format``), its
batches appended in order as they come, so peak memory does not grow with ``N``; the folder
(``meta.json`` plus one ``.npy`` per hook) appears atomically when complete. ``load_cache`` maps it
back lazily (``ActivationCache`` and the format live in ``mechgrok._activation_store``). The model
runs on its own device (its first parameter's; the inputs are moved there batch by batch) and the
activations are always returned on the CPU, so that a dataset's activations need not fit in
accelerator memory.

>>> import mechgrok as mg
>>> task = mg.tasks.modular_arithmetic(p=11, op="add", train_frac=0.5, seed=0)
>>> model = mg.models.transformer(task, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
>>> cache = capture(model, task.inputs, hooks=["blocks.0.mlp.hook_post"], progress=False)
>>> tuple(cache["blocks.0.mlp.hook_post"].shape), cache.meta["backend"]
((121, 3, 32), 'transformer_lens')
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Shaped
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechgrok._activation_store import FORMAT, ActivationCache, _Sink, load_cache
from mechgrok._config import check_int
from mechgrok._io import atomic_dir
from mechgrok.models import HookedRootModule, check_inputs, device_of

__all__ = ["ActivationCache", "capture", "load_cache", "BACKENDS", "default_backend", "check_hook", "edit_output",
           "editing"]

logger = logging.getLogger(__name__)

BACKENDS = ("transformer_lens", "nnsight", "torch")


def capture(model: nn.Module, inputs: Shaped[Tensor, "N ..."], hooks: Sequence[str], *,
            backend: str | None = None, batch_size: int = 8192, out: str | Path | None = None,
            overwrite: bool = False, progress: bool = True) -> ActivationCache:
    """Run ``model`` over ``inputs`` in batches and keep the outputs of ``hooks``.

    Args:
        model: a transformer-lens ``HookedRootModule`` (any backend), or any ``nn.Module`` for
            the ``"torch"`` and ``"nnsight"`` backends. It runs in eval mode under
            ``torch.no_grad()``; each submodule's train/eval flag is restored afterwards, and no
            hook (nor nnsight's wrapper) is left on it.
        inputs: ``[N, ...]`` model inputs (token ids ``[N, n_ctx]`` or floats), split along dim 0.
        hooks: hook names / module paths, e.g. ``["blocks.0.mlp.hook_post"]``. Each hook's
            output must have the batch on dim 0; a tuple output is captured as its element 0.
        backend: ``"transformer_lens"``, ``"torch"`` or ``"nnsight"`` (see the module docstring);
            ``None``: ``default_backend(model)`` (transformer-lens for a ``HookedRootModule``, torch
            otherwise).
        batch_size: examples per forward pass.
        out: a folder to stream to (``meta.json`` + ``{hook}.npy``); ``None`` keeps it in memory.
        overwrite: replace an existing ``out`` folder (only once the new one is complete).
        progress: show a progress bar over batches.

    Returns:
        An ``ActivationCache`` of CPU tensors ``[N, *per_example_shape]``, in the order of
        ``hooks``; memory-mapped from ``out`` when given. In memory, when one batch holds all
        ``N`` examples, the tensors are the hooks' outputs themselves (no copy, as in
        transformer-lens' ``run_with_cache``); otherwise each batch is copied into a
        pre-allocated ``[N, ...]`` tensor.

    Raises:
        ValueError: unknown backend or hook (with the close matches), empty ``hooks`` or ``inputs``,
            ``batch_size < 1``, token ids outside the vocabulary or longer than ``n_ctx``
            (``models.check_inputs``), a hook that does not run or lacks the batch dimension. All
            argument checks happen before the model runs or anything is written.
        TypeError: a model that is not a ``HookedRootModule`` for ``"transformer_lens"``; hook names
            that are not strings; float inputs to a transformer.
        FileExistsError: ``out`` exists and ``overwrite`` is false, or ``out`` is (inside) a file.
    """
    backend = default_backend(model) if backend is None else backend
    hooks, batch_size = _check_args(model, inputs, hooks, backend, batch_size)
    if out is not None and (above := next((q for q in Path(out).parents if q.exists()), None)) and not above.is_dir():
        raise FileExistsError(f"{above} is a file, so {out} cannot be a folder inside it; choose another path")
    if out is not None and Path(out).exists():
        if not Path(out).is_dir():
            raise FileExistsError(f"{out} is a file, not a folder; capture writes a folder (meta.json + one .npy per "
                                  "hook): choose another path")
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it or choose another folder")
    n = int(inputs.shape[0])
    device = device_of(model)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            folder = stack.enter_context(atomic_dir(out)) if out is not None else None
            sink = stack.enter_context(_Sink(n, folder))
            batches = _batches(inputs, batch_size, device, progress, desc=f"capture ({backend})")
            _RUNNERS[backend](model, hooks, batches, sink)
            meta = {"format": FORMAT, "hooks": hooks, "n": n, "shapes": {h: sink.shapes[h] for h in hooks},
                    "dtypes": {h: sink.dtypes[h] for h in hooks}, "backend": backend,
                    "batch_size": batch_size, "model": type(model).__name__}
            if folder is None:
                return ActivationCache({h: sink.tensors[h] for h in hooks}, meta)
            sink.finish(meta)
    finally:
        for m, flag in flags.items():
            m.training = flag
    logger.info("captured %d examples of %s to %s", n, hooks, out)
    return load_cache(out)


# ---------------------------------------------------------------------------- checks


def default_backend(model: nn.Module) -> str:
    """The backend ``capture`` uses when none is named: ``"transformer_lens"`` for a
    ``HookedRootModule`` (its hook points), ``"torch"`` for any other ``nn.Module``."""
    return "transformer_lens" if isinstance(model, HookedRootModule) else "torch"


def check_hook(model: nn.Module, hook: str, backend: str | None = None) -> str:
    """``hook`` if ``model`` has it (a hook point for ``"transformer_lens"``, a module path
    otherwise), or a ``ValueError`` naming the closest valid names (``did you mean ...?``)."""
    if not isinstance(hook, str):
        raise TypeError(f"hook names must be strings, got {hook!r}; e.g. 'blocks.0.mlp.hook_post' or "
                        "'transformer.h.0.mlp'")
    if backend == "transformer_lens":
        known = list(model.hook_dict)
    else:
        known = [name for name, _ in model.named_modules() if name]
    if hook not in set(known):
        close = difflib.get_close_matches(hook, known, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"valid names include {known[:5]}"
        raise ValueError(f"unknown hook {hook!r}; {hint}")
    return hook


def edit_output(model: nn.Module, hook: str, fn: Callable[[Tensor], Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose ``hook`` outputs ``fn(output)``; ``model`` is untouched.

    ``hook`` is a transformer-lens hook point of a ``HookedRootModule`` (the edit is a permanent
    transformer-lens hook, so ``run_with_hooks`` / ``model.hooks`` keep it) or the path of any
    submodule (a forward hook that replaces its output; a tuple output has its element 0
    replaced). ``fn`` receives the activation on the model's device and returns a tensor of the
    same shape. The pure interventions of ``mechgrok.sae`` and ``mechgrok.neurons`` return such copies.
    """
    check_hook(model, hook)
    edited = copy.deepcopy(model)
    if isinstance(edited, HookedRootModule) and hook in edited.hook_dict:
        edited.add_hook(hook, lambda act, hook: fn(act), is_permanent=True)
    else:
        edited.get_submodule(hook).register_forward_hook(_replacer(hook, fn))
    return edited


@contextlib.contextmanager
def editing(model: nn.Module, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s ``hook`` outputs ``fn(output)`` (as ``edit_output``, but on
    ``model`` itself and only until the block ends: for reading gradients at a site)."""
    check_hook(model, hook)
    if isinstance(model, HookedRootModule) and hook in model.hook_dict:
        with model.hooks(fwd_hooks=[(hook, lambda act, hook: fn(act))]):
            yield model
        return
    handle = model.get_submodule(hook).register_forward_hook(_replacer(hook, fn))
    try:
        yield model
    finally:
        handle.remove()


def _replacer(hook: str, fn: Callable[[Tensor], Tensor]) -> Callable:
    """A forward hook that returns ``fn(output)`` (``fn`` of element 0 of a tuple output)."""
    def replace(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (fn(output[0]), *output[1:])
        if not isinstance(output, Tensor):
            raise TypeError(f"{hook!r} returns {type(output).__name__}; an edit needs a module whose output is a "
                            "tensor (or a tuple starting with one): name a submodule that returns one")
        return fn(output)

    return replace


def _check_args(model: nn.Module, inputs: Tensor, hooks: Sequence[str], backend: str,
                batch_size: int) -> tuple[list[str], int]:
    """Validate everything before the model runs; return the hooks without duplicates and the batch size."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)} (or None for the default)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__} (for an nnsight "
                        "wrapper pass the module it wraps)")
    if isinstance(hooks, str):
        raise TypeError(f"hooks must be a list of names, got the string {hooks!r}; write [{hooks!r}]")
    if not isinstance(hooks, Iterable):
        raise TypeError(f"hooks must be a list of hook names, e.g. ['blocks.0.mlp.hook_post'], got {hooks!r}")
    hooks = list(hooks)
    if bad := [h for h in hooks if not isinstance(h, str)]:
        raise TypeError(f"hook names must be strings, got {bad[:3]}; e.g. hooks=['blocks.0.mlp.hook_post']")
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("hooks is empty; name at least one, e.g. hooks=['blocks.0.mlp.hook_post']")
    if not isinstance(inputs, Tensor) or inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError("inputs must be a tensor [N, ...] with N >= 1, got "
                         f"{tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
    batch_size = check_int(batch_size, "batch_size", low=1)
    check_inputs(model, inputs)  # token ids in the vocabulary, lengths within n_ctx (mechgrok models)
    _check_embedding_ids(model, inputs)  # the same for a Hugging Face model
    if backend == "transformer_lens" and not isinstance(model, HookedRootModule):
        raise TypeError(f"backend='transformer_lens' needs a transformer-lens HookedRootModule, got "
                        f"{type(model).__name__}; use backend='torch' or 'nnsight' (or None) for any nn.Module")
    for hook in hooks:
        check_hook(model, hook, backend)
    return hooks, batch_size


def _check_embedding_ids(model: nn.Module, inputs: Tensor) -> None:
    """Token ids outside the input embedding of a model with ``get_input_embeddings`` (Hugging Face
    models) fail here with the range, not later as an ``IndexError`` (or a CUDA assert) inside it."""
    get = getattr(model, "get_input_embeddings", None)
    if isinstance(model, HookedRootModule) or not callable(get) or inputs.is_floating_point() \
            or inputs.is_complex() or inputs.dtype == torch.bool:
        return
    emb = get()
    lo, hi = int(inputs.min()), int(inputs.max())
    if isinstance(emb, nn.Embedding) and (lo < 0 or hi >= emb.num_embeddings):
        raise ValueError(f"inputs hold token ids in [{lo}, {hi}] but the model's vocabulary is [0, "
                         f"{emb.num_embeddings}); tokenize with the model's own tokenizer")


# ---------------------------------------------------------------------------- batches


def _batches(inputs: Tensor, batch_size: int, device: torch.device, progress: bool,
             desc: str) -> Iterator[tuple[int, Tensor]]:
    """``(start, inputs[start:start + batch_size])`` on ``device``, with a progress bar."""
    starts = range(0, inputs.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield start, inputs[start:start + batch_size].to(device)


# ---------------------------------------------------------------------------- backends

Batches = Iterable[tuple[int, Tensor]]


class _Recorder:
    """Sends each hook's first output per batch to the sink and checks that every hook ran.

    When one batch holds all ``N`` examples and the cache stays in memory, outputs are kept by
    reference, with no copy (as transformer-lens' ``run_with_cache`` does). If the model then
    edits one of them in place later in the same forward (its version counter moves), the batch
    is run again with copies, so a captured value is always the hook's output at the time.
    """

    def __init__(self, hooks: list[str], sink: _Sink):
        self.hooks, self.sink = hooks, sink
        self.by_reference = sink.folder is None
        self.start, self.rows, self.seen, self.versions = 0, 0, set(), {}

    def run(self, forward: Callable[[Tensor], Any], batches: Batches) -> None:
        """Call ``forward`` on each batch while the hooks call this recorder."""
        for start, batch in batches:
            if not self._run_one(forward, start, batch):
                logger.debug("a captured activation was edited in place; capturing copies instead")
                self.by_reference = False
                self.sink.tensors.clear()
                self.sink.shapes.clear()
                self._run_one(forward, start, batch)

    def _run_one(self, forward: Callable[[Tensor], Any], start: int, batch: Tensor) -> bool:
        self.start, self.rows, self.seen, self.versions = start, len(batch), set(), {}
        forward(batch)
        missing = [h for h in self.hooks if h not in self.seen]
        if missing:
            raise _not_run(missing)
        return all(self.sink.tensors[h]._version == v for h, v in self.versions.items())

    def __call__(self, name: str, value: Any) -> None:
        if name in self.seen:  # a module called twice per forward: keep its first call
            return
        self.seen.add(name)
        if isinstance(value, tuple):
            value = value[0]
        if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != self.rows:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"hook {name!r} gave {got} for a batch of {self.rows} examples; capture needs a "
                             "tensor (or a tuple starting with one) with the batch on dim 0")
        value = value.detach()
        if self.by_reference and self.rows == self.sink.n and value.device.type == "cpu":
            self.sink.keep(name, value)
            self.versions[name] = value._version
        else:
            self.sink.write(name, self.start, value)


def _not_run(missing: list[str]) -> ValueError:
    return ValueError(f"hooks {missing} did not run during the forward pass; capture modules the forward "
                      "actually calls")


def _run_transformer_lens(model: HookedRootModule, hooks: list[str], batches: Batches, sink: _Sink) -> None:
    # `model.hooks` installs the hooks once for all batches (what run_with_hooks does per call).
    # Over several batches each hook copies its activation straight into the pre-allocated
    # output, where run_with_cache would keep one tensor per batch and concatenate them.
    recorder = _Recorder(hooks, sink)
    fwd = [(name, lambda t, hook, name=name: recorder(name, t)) for name in hooks]
    with model.hooks(fwd_hooks=fwd):
        recorder.run(model, batches)


def _run_torch(model: nn.Module, hooks: list[str], batches: Batches, sink: _Sink) -> None:
    recorder = _Recorder(hooks, sink)
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _args, output, name=name: recorder(name, output)) for name in hooks]
    try:
        recorder.run(model, batches)
    finally:
        for h in handles:
            h.remove()


def _execution_order(model: nn.Module, hooks: list[str], batch: Tensor) -> list[str]:
    """``hooks`` sorted by when their module first runs, from a forward on one example."""
    order: list[str] = []

    def note(name: str) -> Callable:
        return lambda *_: order.append(name) if name not in order else None

    handles = [model.get_submodule(h).register_forward_hook(note(h)) for h in hooks]
    try:
        model(batch[:1])
    finally:
        for h in handles:
            h.remove()
    missing = [h for h in hooks if h not in order]
    if missing:
        raise _not_run(missing)
    return order


def _run_nnsight(model: nn.Module, hooks: list[str], batches: Batches, sink: _Sink) -> None:
    import nnsight
    from nnsight.intervention import source as nnsight_source

    batches = iter(batches)
    first = next(batches)
    order = _execution_order(model, hooks, first[1])
    recorder = _Recorder(order, sink)
    # NNsight installs a controller as the `forward` of every module, permanently; undo that
    # afterwards so the caller's model is left as it was.
    state = getattr(nnsight_source, "STATE", "__nnsight__")
    before = {m: m.__dict__.get("forward") for m in model.modules() if state not in m.__dict__}
    try:
        traced = nnsight.NNsight(model)
        envoys = [(name, traced.get(name)) for name in order]

        def forward(batch: Tensor) -> None:
            with traced.trace(batch):
                # The trace body runs while the model is paused at each module, so `.output` is
                # the live tensor: hand it to the recorder now instead of `.save()`-ing it.
                for name, envoy in envoys:
                    recorder(name, envoy.output)

        recorder.run(forward, itertools.chain([first], batches))
    finally:
        for m, own_forward in before.items():
            m.__dict__.pop(state, None)
            if own_forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = own_forward


_RUNNERS: dict[str, Callable[[nn.Module, list[str], Batches, _Sink], None]] = {
    "transformer_lens": _run_transformer_lens,
    "torch": _run_torch,
    "nnsight": _run_nnsight,
}
