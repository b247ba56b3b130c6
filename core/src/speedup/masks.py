"""Loading and checking masks, before anything of the model is touched.

Layouts accepted (NNI's, as pruning tools write them):

* ``{module_name: {"weight": mask, "bias": mask}}``: any parameter or buffer name of the module;
* ``{module_name: {"_input_0": mask, "_output_0": mask}}``: NNI 3.0 targets on a module's inputs
  and outputs (a position, or an argument name / output key), applied as ``tensor * mask``;
* ``{"module.param": mask}``: the flat form;
* any of these saved with ``torch.save``, given as a path (loaded with ``map_location``).

A mask holds 0 (pruned) and 1 (kept), as bool or numbers, and broadcasts to its target's shape.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .boolean import any_along
from .errors import MaskError
from .wrappers import COMPILED_ATTR, compiled_inner

MaskSource = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass
class TensorMask:
    """A mask on a module's input or output: ``tensor * mask``."""

    module: str
    kind: str
    """``"input"`` or ``"output"``."""
    key: Union[int, str]
    mask: torch.Tensor
    batch_dim: int = 0

    @property
    def target(self) -> str:
        return f"_{self.kind}_{self.key}"


@dataclass
class Masks:
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    """Qualified parameter or buffer name -> mask of the parameter's shape."""
    masked: dict[str, torch.Tensor] = field(default_factory=dict)
    """Qualified parameter or buffer name -> the parameter or buffer itself (found once, when loading)."""
    tensors: list[TensorMask] = field(default_factory=list)
    carried: set[str] = field(default_factory=set)
    """Names whose only mask is one the model carries itself (see :meth:`join`)."""
    warnings: list[str] = field(default_factory=list)
    _patterns: dict[str, "MaskPattern"] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.parameters or self.tensors)

    def join(self, name: str, mask: torch.Tensor, tensor: torch.Tensor) -> None:
        """Adds a mask the model carries itself for ``tensor`` (qualified ``name``): an entry it or
        the mask given for the call masks is masked."""
        given = self.parameters.get(name)
        if given is None:
            self.carried.add(name)
        self.put(name, mask if given is None else given & mask.to(given.device), tensor)

    def put(self, name: str, mask: torch.Tensor, tensor: torch.Tensor) -> None:
        """Sets the mask of ``tensor`` (qualified ``name``), in place of any."""
        self.parameters[name] = mask
        self.masked[name] = tensor
        self._patterns.pop(name, None)

    def drop(self, name: str) -> None:
        """Forgets the mask of ``name`` (a tensor no longer in the model)."""
        for table in (self.parameters, self.masked, self._patterns):
            table.pop(name, None)
        self.carried.discard(name)

    def masks_any(self, name: str) -> bool:
        """Whether the call masks an entry of ``name`` beyond what the model carries itself."""
        mask = self.parameters.get(name)
        return mask is not None and name not in self.carried and not bool(mask.all())

    def pattern(self, name: str) -> "MaskPattern":
        """The :class:`MaskPattern` of a parameter's mask, found once (masking and analysis need it)."""
        if name not in self._patterns:
            self._patterns[name] = mask_pattern(self.parameters[name])
        return self._patterns[name]


def load_masks(source: MaskSource, model: nn.Module, map_location: Any = None, batch_dim: int = 0) -> Masks:
    raw = _read(source, map_location)
    modules = dict(model.named_modules())
    through: dict[str, str] = {}
    masks = Masks()
    for name, entry in raw.items():
        if isinstance(entry, torch.Tensor) or entry is None:
            module_name, _, target = str(name).rpartition(".")
            entry = {target: entry}
        else:
            module_name = name
        if not isinstance(entry, Mapping):
            raise MaskError(
                f"masks['{name}'] is a {type(entry).__name__}; expected a dict of target name -> mask, as in "
                "{'conv1': {'weight': mask, 'bias': mask}}."
            )
        module_name = _module_name(modules, module_name, through)
        module = modules[module_name]
        for target, mask in entry.items():
            if mask is None:
                continue
            mask = _checked_values(mask, module_name, target, map_location)
            if target.startswith(("_input_", "_output_")):
                masks.tensors.append(_tensor_mask(module_name, target, mask, batch_dim))
            else:
                qualified = f"{module_name}.{target}" if module_name else target
                tensor = _parameter(module, module_name, target)
                masks.parameters[qualified] = _fitted(mask, tensor, qualified)
                masks.masked[qualified] = tensor
    _join_tied(masks, model)
    return masks


def _join_tied(masks: Masks, model: nn.Module) -> None:
    """Masks given for one tensor under several names (weights tied between modules) become one, under
    the name the model lists first: the masked model multiplies the tensor by each of them, so an entry
    any of them masks is masked. Left apart, the recording and the model would each take another."""
    names: dict[int, list[str]] = {}
    for name, tensor in masks.masked.items():
        names.setdefault(id(tensor), []).append(name)
    tied = [found for found in names.values() if len(found) > 1]
    if not tied:
        return
    first = held_tensors(model.named_modules(remove_duplicate=False))
    for found in tied:
        tensor, given = masks.masked[found[0]], [masks.parameters[name] for name in found]
        joined = functools.reduce(torch.logical_and, given)
        if not all(torch.equal(mask, given[0]) for mask in given[1:]):
            listed = ", ".join(f"'{name}'" for name in found)
            masks.warnings.append(
                f"the masks for {listed} differ, but name one tensor (weights tied between modules): it is masked "
                "where any of them masks it, as the masked model multiplies it by each."
            )
        for name in found:
            masks.drop(name)
        masks.put(first[id(tensor)][1], joined, tensor)


def held_tensors(named_modules: Iterable[tuple[str, nn.Module]]) -> dict[int, tuple[torch.Tensor, str, nn.Module, str]]:
    """Every parameter and buffer of the modules (``named_modules(remove_duplicate=False)``) by id:
    the tensor, its qualified name, its module and attribute, under the first name listed (a weight
    tied between modules has one name)."""
    held: dict[int, tuple[torch.Tensor, str, nn.Module, str]] = {}
    for module_name, module in named_modules:
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and id(tensor) not in held:
                held[id(tensor)] = (tensor, f"{module_name}.{attr}" if module_name else attr, module, attr)
    return held


def _read(source: MaskSource, map_location: Any) -> Mapping[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        try:
            loaded = torch.load(source, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise MaskError(f"mask file '{source}' does not exist; pass the path of a torch.save'd dict of masks.") from None
        except Exception as exc:
            raise MaskError(f"could not load masks from '{source}': {exc}. Save them with torch.save(masks, path).") from exc
        source = loaded
    if not isinstance(source, Mapping):
        raise MaskError(f"masks must be a dict (or a path to one saved with torch.save), got {type(source).__name__}.")
    return source


def _module_name(modules: dict[str, nn.Module], name: str, through: dict[str, str]) -> str:
    """The name of the module ``name`` names, where either may pass through ``torch.compile``'s wrappers
    (the model's, or a submodule's: ``layer1 = torch.compile(layer1)`` names its convs
    ``layer1._orig_mod.0.conv1``, masks made before it ``layer1.0.conv1``; see :mod:`.wrappers`).
    ``through``: the modules by their names with the wrappers left out, filled on the first name not found."""
    if name not in modules:
        if not through:
            through.update((_through_compiled(n), n) for n in modules)
        name = through.get(_through_compiled(name), name)
    if name in modules:
        while compiled_inner(modules[name]) is not None:  # a wrapper named: the module it compiles
            name = f"{name}.{COMPILED_ATTR}"
        return name
    owner, found, _ = name.partition(".parametrizations.")
    if found and owner in modules:  # frozen for the call (see speedup.parametrized)
        raise MaskError(
            f"masks name '{name}', inside the parametrization of '{owner}' (weight norm, spectral norm...). A "
            f"parametrized tensor is masked as the layer computes it: name that tensor ({{'{owner}': {{'weight': "
            "mask}}), not what it is computed from."
        )
    wrapped = [n for n in modules if n.endswith(f".{name}")][:3]  # DataParallel's 'module.conv' for 'conv'
    close = wrapped or difflib.get_close_matches(name, list(modules), n=3)
    hint = f" Close names: {', '.join(repr(c) for c in close)}." if close else ""
    raise MaskError(
        f"masks name module '{name}', which the model does not have.{hint} "
        "Mask keys are the names of model.named_modules()."
    )


def _through_compiled(name: str) -> str:
    """A module's name with the ``torch.compile`` wrappers on its path left out."""
    return ".".join(part for part in name.split(".") if part != COMPILED_ATTR)


def named_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The parameter or buffer ``name`` (dotted) of ``module``, or ``None`` if it has none (found by
    hand: a TorchScript module has no ``get_parameter``)."""
    path, _, attr = name.rpartition(".")
    for part in path.split(".") if path else []:
        if part not in module._modules:  # a TorchScript module's tables have no ``get``
            return None
        module = module._modules[part]
    for table in (module._parameters, module._buffers):
        if attr in table and isinstance(table[attr], torch.Tensor):
            return table[attr]
    return None


def _parameter(module: nn.Module, module_name: str, target: str) -> torch.Tensor:
    tensor = named_tensor(module, target)
    if tensor is None:
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        parametrized = target.startswith("parametrizations.") or target.endswith(("_g", "_v", "_orig", "_mask"))
        hint = (" A parametrized or pruned tensor (weight norm, spectral norm, torch.nn.utils.prune) is masked as the "
                "layer computes it: name that tensor ('weight'), not what it is computed from." if parametrized else "")
        if type(module).__module__.startswith("torch.ao.nn.quantized"):  # its weight is packed, of fixed sizes
            hint += (f" {type(module).__module__}.{type(module).__name__} is quantized: speed up the float model, then "
                     "quantize it (a model prepared for quantization-aware training shrinks as it is).")
        raise MaskError(
            f"masks['{module_name}'] has a mask for '{target}', but {type(module).__name__} '{module_name}' has no such "
            f"parameter or buffer (it has: {', '.join(names) or 'none'}). Inputs and outputs are masked as "
            f"'_input_0' / '_output_0'.{hint}"
        )
    return tensor


def _checked_values(mask: Any, module_name: str, target: str, map_location: Any) -> torch.Tensor:
    where = f"mask '{target}' of '{module_name}'"
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception:
            raise MaskError(f"{where} is a {type(mask).__name__}, not a tensor of 0 and 1.") from None
    if map_location is not None and not isinstance(map_location, (dict,)) and not callable(map_location):
        mask = mask.to(map_location)
    if mask.is_meta:
        raise MaskError(f"{where} is on the meta device, which holds no values; load the masks with "
                        "map_location='cpu' (or the model's device).")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise MaskError(f"{where} is complex; a mask holds 0 and 1.")
        values = mask.detach()
        ones = values == 1
        # Every non-zero entry is a one: two passes over the values (the comparison above is the mask).
        if int(torch.count_nonzero(values)) != int(torch.count_nonzero(ones)):
            bad = (values != 0) & ~ones
            example = values[bad].flatten()[:3].tolist()
            raise MaskError(
                f"{where} holds values other than 0 and 1 (for example {example}). A mask marks pruned entries with 0 "
                "and kept ones with 1; threshold a score first (score > t)."
            )
        return ones
    return mask


def _fitted(mask: torch.Tensor, tensor: torch.Tensor, name: str) -> torch.Tensor:
    if mask.shape == tensor.shape:
        return mask  # the usual case; torch.broadcast_shapes costs tens of microseconds a call
    try:
        shape = torch.broadcast_shapes(mask.shape, tensor.shape)
    except RuntimeError:
        shape = None
    if shape != tensor.shape:
        per_row = ""
        if mask.dim() == 1 and tensor.dim() > 1 and mask.shape[0] == tensor.shape[0]:  # one entry per output channel
            ones = ", 1" * (tensor.dim() - 1)
            per_row = (f" For one entry per output channel, give it shape ({tensor.shape[0]}{ones}): "
                       f"mask[:{', None' * (tensor.dim() - 1)}].")
        raise MaskError(
            f"the mask for '{name}' has shape {tuple(mask.shape)}, but '{name}' has shape {tuple(tensor.shape)}. "
            f"A parameter mask has the parameter's shape (or broadcasts to it, aligned from the right).{per_row}"
        )
    return mask.expand(tensor.shape)


def _tensor_mask(module: str, target: str, mask: torch.Tensor, batch_dim: int) -> TensorMask:
    """An input/output mask; its shape is checked against the tensor when that is known (tracing)."""
    kind, _, key = target[1:].partition("_")
    parsed: Union[int, str] = int(key) if key.isdigit() else key
    return TensorMask(module, kind, parsed, mask, batch_dim)


@dataclass(eq=False)
class MaskPattern:
    """Where a parameter's mask keeps entries, found in one pass when the masks are loaded.

    Zeroing the parameter, the analysis and the rules all ask "which rows / columns / kernel taps
    keep an entry" of every masked weight; answering from this summary instead of passing over the
    mask again each time was a tenth of the speedup call on densenet201.
    """

    mask: torch.Tensor
    """The mask itself, at the parameter's shape (possibly a broadcast view)."""
    dim: Optional[int]
    """The one dimension the mask varies along (``None``: it varies along several)."""
    line: Optional[torch.Tensor]
    """With ``dim``: the 1-D mask along it."""
    given_pair: Optional[torch.Tensor]
    """:attr:`pair` where reading the mask found it; None where it follows from ``leading``."""
    separable: bool
    """The mask keeps exactly the rows of ``kept(0)`` times the columns of ``kept(1)``, every entry
    of the trailing dimensions (so ``pair`` is their outer product)."""
    leading: tuple = ()
    """``kept(0)`` and, for two or more dimensions, ``kept(1)``."""

    @functools.cached_property
    def pair(self) -> Optional[torch.Tensor]:
        """For two or more dimensions: ``(shape[0], shape[1])``, whether any entry of the slice at
        ``[i, j]`` is kept (the kernel taps of a convolution, the mask itself for a linear weight).
        Made on first use for a mask varying along one dimension (few rules ask)."""
        if self.given_pair is not None or len(self.leading) < 2:
            return self.given_pair
        return self.leading[0][:, None] & self.leading[1][None, :]

    def kept(self, dim: int) -> torch.Tensor:
        """Boolean per slice along ``dim``: the mask keeps some entry of it."""
        if dim < len(self.leading):
            return self.leading[dim]
        if self.dim is not None:
            return self.line if dim == self.dim else _filled_like(self.line, self.mask.shape[dim])
        return any_along(self.mask.movedim(dim, 0).reshape(self.mask.shape[dim], -1), 1)

    def apply(self, data: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``data`` times the mask, in new storage (or in ``out``, of ``data``'s shape and dtype).

        A large weight losing rows times columns: the columns multiply (a vector broadcast over the
        rows, as fast as a copy) and the removed rows are filled with zeros; twice as fast on a 400 MB
        weight as multiplying by the whole mask, whose bytes must be converted on the way. A small
        one: one multiplication by the mask's bytes, fewer operations.
        """
        if self.dim is not None:
            shape = [1] * data.dim()
            shape[self.dim] = -1
            return torch.mul(data, self.line.to(device=data.device, dtype=data.dtype).reshape(shape), out=out)
        if (self.separable and data.numel() >= _LARGE and data.is_floating_point() and data.is_contiguous()
                and (out is None or out.is_contiguous())):
            columns = self.kept(1).to(device=data.device, dtype=data.dtype)
            grid = (data.shape[0], data.shape[1], -1)
            masked = torch.mul(data.view(grid), columns.view(1, -1, 1), out=None if out is None else out.view(grid))
            masked.index_fill_(0, (~self.kept(0)).to(data.device).nonzero().reshape(-1), 0)
            return masked.view(data.shape)
        return times_mask(data, self.mask, out)

    def cpu(self) -> "MaskPattern":
        """The same pattern with its small parts on the CPU (the analysis runs there)."""
        if self.mask.device.type == "cpu":
            return self
        move = lambda t: None if t is None else t.cpu()  # noqa: E731
        return MaskPattern(self.mask.cpu(), self.dim, move(self.line), move(self.given_pair), self.separable,
                           tuple(t.cpu() for t in self.leading))


_LARGE = 1 << 20
"""Elements from which a weight is large enough for the rows-times-columns way of masking to pay."""


def times_mask(data: torch.Tensor, mask: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``data`` times a boolean mask of its shape (or broadcasting to it), in new storage or ``out``."""
    mask = mask.to(data.device)
    if data.is_floating_point():  # times the mask's bytes: several times faster than a boolean operand
        return torch.mul(data, mask.view(torch.uint8), out=out)
    return torch.where(mask, data, torch.zeros((), dtype=data.dtype, device=data.device), out=out)


def mask_pattern(mask: torch.Tensor) -> MaskPattern:
    """The :class:`MaskPattern` of a boolean mask.

    Broadcast (expanded) masks are recognised from their strides, without reading them. A
    materialised mask of two or more dimensions is read for its kept rows and its count of kept
    entries, which tells whether it keeps whole rows (a channel pruner's); any other is read for its
    kept columns, which tells whether it is rows times columns; only a mask that is not is read
    again for its kernel taps (``pair``). Each reduction runs over whole rows or across
    them, never along the small trailing kernel dimension (ten times slower for a 3x3 kernel).
    """
    for dim in range(mask.dim()):
        if all(mask.stride(d) == 0 or mask.shape[d] == 1 for d in range(mask.dim()) if d != dim):
            line = _line(mask, dim)
            leading = tuple(line if d == dim else _filled_like(line, mask.shape[d]) for d in range(min(mask.dim(), 2)))
            return MaskPattern(mask, dim, line, None, dim < 2 or bool(line.all()), leading)
    if mask.dim() < 2:  # a 0-D mask
        return MaskPattern(mask, None, None, None, False)
    grid = mask.reshape(mask.shape[0], mask.shape[1], -1)
    rows = any_along(grid.reshape(grid.shape[0], -1), 1)
    n_rows, n_kept = int(torch.count_nonzero(rows)), int(torch.count_nonzero(grid))
    if n_rows and n_kept == n_rows * grid.shape[1] * grid.shape[2]:
        # Whole rows: every column is kept, known without the reduction across rows (half the
        # time this function took on densenet201's masks).
        cols = torch.ones(grid.shape[1], dtype=torch.bool, device=mask.device)
        return MaskPattern(mask, 0, rows, None, True, (rows, cols))
    cols = any_along(any_along(grid, 0), 1)
    n_cols = int(torch.count_nonzero(cols))
    separable = n_kept == n_rows * n_cols * grid.shape[2]
    # Rows times columns: the taps of each pair follow from them (MaskPattern.pair).
    pair = None if separable else any_along(grid, 2)
    if separable and n_cols == cols.numel():
        return MaskPattern(mask, 0, rows, pair, True, (rows, cols))
    if separable and n_rows == rows.numel():
        return MaskPattern(mask, 1, cols, pair, True, (rows, cols))
    return MaskPattern(mask, None, None, pair, separable, (rows, cols))


def _filled_like(line: torch.Tensor, n: int) -> torch.Tensor:
    """The kept slices along a dimension a mask does not vary along: all, or none if it keeps nothing."""
    return torch.full((n,), bool(line.any()), dtype=torch.bool, device=line.device)


def _line(mask: torch.Tensor, dim: int) -> torch.Tensor:
    index = [0] * mask.dim()
    index[dim] = slice(None)
    return mask[tuple(index)]
