"""The analysis passes over a recorded graph, and the context every rule works through.

Three passes, each once over the nodes (the recording order is a topological order, so no pass
iterates to a fixpoint):

1. **couple**: rules relate dimensions through atoms (see :mod:`speedup.atoms`); the atom table is
   solved once afterwards.
2. **forward**: rules say which output entries are constant ("direct sparsity").
3. **backward**: rules say which input entries they need ("indirect sparsity"), starting from the
   graph outputs, which need every entry but their constant ones (put back after the model, see
   :mod:`speedup.output_constants`).

Per dimension of every value the passes leave ``atoms`` (an atom per entry, ``None`` for a
dimension that keeps its size), ``consts`` (:class:`~speedup.rule.DimConst` or ``None``) and
``demand``. :mod:`speedup.planning` turns them into kept entries.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .atoms import AtomSolution, AtomTable
from .masks import MaskPattern
from .graph import Graph, Node, NodeKind, Origin, TensorValue
from .rule import DimConst, Rule

_UNSET = object()


class Analysis:
    """Runs the passes and is the ``ctx`` argument of every rule method."""

    def __init__(self, graph: Graph, rule_for: Callable[[Node], Optional[Rule]], barrier: Rule):
        self.graph = graph
        self.table = AtomTable()
        self.solution: Optional[AtomSolution] = None
        self.barriers: list[Node] = []
        self.warnings: list[str] = []
        self._handled: set[tuple[int, int]] = set()
        self._node: Optional[Node] = None
        self._uniform: dict[int, Optional[float]] = {}
        self._memo: dict = {}
        self.masks: dict[int, MaskPattern] = {}
        """Masks of masked parameters, by value index: where a weight is zero, known without reading it."""
        self.no_fold: set[str] = set()
        """Modules (by name) rebuilt by the user's function: they cannot fold constants."""
        self.pinning: dict[int, list[tuple[TensorValue, int]]] = {}
        """Nodes (by index) that pinned a dimension of a computed input that could have shrunk: those
        inputs and dimensions."""
        self.offering = False
        """Whether the coupling is read to choose what to prune. A rule may then tie together entries it
        could lose apart, offering what its replacement runs fastest without: a GroupNorm offers whole
        groups, though it can lose any channel holding a constant."""
        self._barrier = barrier
        self._unknown: set[int] = set()
        for node in graph.nodes:
            # Kept whole, not reported: a call passing a number read from the input; a module holding,
            # during its call, tensors that are no parameters of the model in place of its own
            # (``torch.func.functional_call`` with a computed weight), which its rule cannot rebuild.
            swapped = node.kind is NodeKind.MODULE and any(
                p.origin is not Origin.PARAMETER for p in node.params.values())
            rule = barrier if node.reads_input_numbers or swapped else rule_for(node)
            if rule is None:
                rule = barrier
                self._unknown.add(node.index)
            node.rule = rule

    def run(self, pinned_nodes: frozenset = frozenset(), pinned_dims: Optional[dict[int, set[int]]] = None) -> None:
        """All three passes. ``pinned_nodes`` (node indices) are treated as barriers; ``pinned_dims``
        keeps dimensions of some nodes' first output whole (node index -> dimensions)."""
        self.couple(pinned_nodes, pinned_dims)
        self.propagate(pinned_nodes)

    def propagate(self, pinned_nodes: frozenset = frozenset()) -> None:
        """The forward and backward passes, after :meth:`couple` with the same ``pinned_nodes``."""
        for node in self.graph.nodes:
            self._node = node
            node.rule.forward(node, self)
        for value in self.graph.outputs:
            self.demand(value, self._returned_demand(value))
        for node in reversed(self.graph.nodes):
            self._node = node
            if node.index in pinned_nodes:
                Rule.backward(node.rule, node, self)
            else:
                node.rule.backward(node, self)
        self._node = None

    def _returned_demand(self, value: TensorValue) -> dict[int, torch.Tensor]:
        """What the caller needs of a returned tensor: every entry but the constant ones along
        dimensions that may shrink (those are put back after the model). A dimension repeating its
        channels (anchors times positions, as a detection head returns them) keeps every entry: on
        another input they repeat another number of times, where nothing could put them back."""
        demand = {}
        for d in range(value.ndim):
            atoms = value.atoms[d] if value.atoms else None
            if atoms is not None and torch.unique(atoms).numel() == atoms.numel():
                consts = self.const(value, d)
                if consts is not None and consts.any():
                    demand[d] = ~consts.mask
        return demand

    def couple(self, pinned_nodes: frozenset = frozenset(),
               pinned_dims: Optional[dict[int, set[int]]] = None, offering: bool = False) -> AtomSolution:
        """The coupling pass alone: which entries of which dimensions live or go together.

        ``offering``: the coupling is read to choose what to prune (:func:`speedup.groups.find_groups`),
        not to remove what masks zero. Every entry of the model's results is kept: the returned
        tensors that nothing in the model reads further (class scores are not offered; a hidden
        state the model returns besides using it is); otherwise returned entries go where they are
        constant. Rules may couple more coarsely than what they can lose (see :attr:`offering`).
        """
        self.offering = offering
        self.table = AtomTable()
        self.barriers = []
        self.pinning = {}
        self._factorings: dict[int, tuple] = {}
        for value in self.graph.values:
            value.atoms, value.demand, value.kept = [], None, []
        for node in self.graph.nodes:
            self._couple(node, pinned_nodes)
        if pinned_dims:
            by_index = {node.index: node for node in self.graph.nodes}
            for index, dims in pinned_dims.items():
                for d in dims:
                    self._pin_dim(by_index[index].outputs[0], d)
        if offering:
            for value in self.graph.outputs:
                for d in range(value.ndim if not value.consumers else 0):
                    self._pin_dim(value, d)
        self.solution = self.table.solve()
        return self.solution

    def _couple(self, node: Node, pinned_nodes: frozenset) -> None:
        self._node = node
        self._handled = set()
        for value in node.outputs:
            value.atoms = [_UNSET] * value.ndim
        if node.index in self._unknown and any(a is not None for v in node.inputs for a in (v.atoms or [None])):
            self.barriers.append(node)  # something prunable reaches an operator nobody knows
        if node.index not in pinned_nodes:
            node.rule.couple(node, self)
        for value in node.inputs:
            for d in range(value.ndim):
                if (value.index, d) not in self._handled:
                    self._pin_input(value, d)
        for value in node.outputs:
            value.atoms = [None if a is _UNSET else a for a in value.atoms]
            if node.index in pinned_nodes:
                value.atoms = [None] * value.ndim

    # -- coupling ---------------------------------------------------------------------------

    def _slot(self, value: TensorValue, d: int):
        """Current atoms of a dimension; ``_UNSET`` only where this node may still assign them."""
        atoms_of = value.atoms
        if not atoms_of:
            atoms_of = value.atoms = [_UNSET] * len(value.shape)
        atoms = atoms_of[d]
        if atoms is _UNSET and not (value.producer is self._node or value.origin is Origin.PARAMETER):
            atoms = atoms_of[d] = None  # inputs and foreign constants keep their size
        return atoms

    def atoms(self, value: TensorValue, dim: int) -> Optional[torch.Tensor]:
        """The atoms of one dimension, or ``None`` if it keeps its size whatever happens.

        A rule that reads a dimension's atoms takes charge of it (ties, defines or pins them): the
        engine no longer pins it by default.
        """
        d = value.dim(dim)
        self._handled.add((value.index, d))
        atoms = self._slot(value, d)
        if atoms is _UNSET:
            atoms = value.atoms[d] = self.table.fresh(value.shape[d])
        return atoms

    def assign(self, value: TensorValue, dim: int, atoms: Optional[torch.Tensor]) -> None:
        """Gives an output dimension its atoms (``None``: it keeps its size)."""
        d = value.dim(dim)
        if atoms is not None and atoms.numel() != value.shape[d]:
            raise ValueError(f"{self._where()}: {atoms.numel()} atoms for a dimension of size {value.shape[d]}")
        if self._slot(value, d) is not _UNSET:
            raise ValueError(f"{self._where()}: dimension {d} of {value} is already assigned")
        value.atoms[d] = atoms
        self._handled.add((value.index, d))

    def link(self, a: TensorValue, da: int, b: TensorValue, db: int) -> None:
        """Entry ``i`` of ``a`` along ``da`` and of ``b`` along ``db`` are kept or removed together."""
        if da < 0:
            da += len(a.shape)
        if db < 0:
            db += len(b.shape)
        if a.shape[da] != b.shape[db]:
            raise ValueError(f"{self._where()}: cannot link sizes {a.shape[da]} and {b.shape[db]}")
        handled = self._handled
        handled.add((a.index, da))
        handled.add((b.index, db))
        atoms_a, atoms_b = self._slot(a, da), self._slot(b, db)
        if atoms_a is _UNSET and atoms_b is _UNSET:
            atoms_a = a.atoms[da] = self.table.fresh(a.shape[da])
        if atoms_b is _UNSET:
            b.atoms[db] = atoms_a
        elif atoms_a is _UNSET:
            a.atoms[da] = atoms_b
        elif atoms_a is None:
            if atoms_b is not None:
                self.table.pin(atoms_b)
        elif atoms_b is None:
            self.table.pin(atoms_a)
        else:
            self.table.tie(atoms_a, atoms_b)

    def link_all(self, a: TensorValue, b: TensorValue) -> None:
        """Links every dimension of two same-shaped values."""
        for d in range(a.ndim):
            self.link(a, d, b, d)

    def accept(self, value: TensorValue, dim: int) -> None:
        """The node takes any subset of this input dimension without tying it to anything."""
        self._handled.add((value.index, value.dim(dim)))

    def pin(self, value: TensorValue, dim: int) -> None:
        """This dimension keeps its size."""
        self._handled.add((value.index, value.dim(dim)))
        if any(v is value for v in self._node.inputs):
            self._pin_input(value, dim)
        else:
            self._pin_dim(value, dim)

    def _pin_input(self, value: TensorValue, dim: int) -> None:
        """Pins a dimension of an input of the current node, noting the node where the dimension could
        have shrunk (:attr:`pinning`)."""
        d = value.dim(dim)
        if value.origin is not Origin.PARAMETER and value.atoms and isinstance(value.atoms[d], torch.Tensor):
            self.pinning.setdefault(self._node.index, []).append((value, d))
        self._pin_dim(value, d)

    def _pin_dim(self, value: TensorValue, dim: int) -> None:
        d = value.dim(dim)
        atoms = self._slot(value, d)
        if atoms is _UNSET:
            value.atoms[d] = None
        elif atoms is not None:
            self.table.pin(atoms)

    def note_factoring(self, source: torch.Tensor, factors: list[torch.Tensor]) -> None:
        """Records that ``source[i]`` was defined as the conjunction of ``factors`` (outermost first,
        row-major), so that reassembling exactly these factors is recognised as a permutation."""
        record = (source, factors)
        for position, factor in enumerate(factors):
            self._factorings[id(factor)] = (record, position)

    def reassembled(self, factors: list[torch.Tensor], coordinates: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """If ``factors`` are all the factors of one recorded factoring (in any order), the source atoms
        at the given per-factor coordinates: a reshape that only permutes, as a channel shuffle does."""
        origins = [self._factorings.get(id(f)) for f in factors]
        if any(o is None for o in origins) or len({id(o[0][0]) for o in origins}) != 1:
            return None
        source, recorded = origins[0][0]
        positions = [o[1] for o in origins]
        if sorted(positions) != list(range(len(recorded))):
            return None
        sizes = [f.numel() for f in recorded]
        strides = [1] * len(sizes)
        for k in range(len(sizes) - 2, -1, -1):
            strides[k] = strides[k + 1] * sizes[k + 1]
        index = sum(coordinate * strides[position] for coordinate, position in zip(coordinates, positions))
        return source[index]

    def fresh(self, n: int) -> torch.Tensor:
        """New atoms for a dimension that no input determines (an expanded dimension, conv outputs)."""
        return self.table.fresh(n)

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Atom arrays of equal length whose entries live or go together (many-to-one by repeating)."""
        self.table.tie(a, b)

    def require(self, dependent: torch.Tensor, required: torch.Tensor) -> None:
        """Atom arrays of equal length: an entry of ``dependent`` is kept only with the matching entry of
        ``required``, which may be kept without it. Unlike :meth:`define`, this says nothing of sizes."""
        self.table.require(dependent, required)

    def define(self, atoms: torch.Tensor, parts: torch.Tensor, offered: int = 0) -> None:
        """``atoms[i]`` exists exactly when every atom of row ``parts[i]`` does.

        ``offered`` is the factor (column of ``parts``) that pruning algorithms pick as their unit;
        the others are never offered on their own. The outermost by default: whole heads, not one
        position in every head.
        """
        self.table.define(atoms, parts, offered)

    def memo(self, key, compute: Callable[[], object]):
        """``compute()`` once per analysis for ``key`` (weight patterns read by several passes)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- constants ------------------------------------------------------------------------

    def const(self, value: TensorValue, dim: int) -> Optional[DimConst]:
        """Constant entries along a dimension; ``None`` when none are known.

        For a masked weight (two or more dimensions) the mask says which slices are zero without a
        pass over the weight; other slices are taken to vary, which is conservative.
        """
        consts = value.consts
        if not consts:
            consts = value.consts = [_UNSET] * len(value.shape)
        found = consts[dim]
        if found is _UNSET:
            d = value.dim(dim)
            if value.ndim >= 2 and value.index in self.masks:
                found = self._masked_slices(value, d)
            elif value.data is not None and not value.follows_sizes:
                found = numeric_const(value.host(), d)
            else:
                found = None
            consts[d] = found
        return found

    def _masked_slices(self, value: TensorValue, d: int) -> Optional[DimConst]:
        kept = self.kept_slices(value, d)
        return DimConst.where(~kept, torch.zeros(kept.numel(), dtype=torch.float64)) if not bool(kept.all()) else None

    def kept_slices(self, value: TensorValue, dim: int) -> torch.Tensor:
        """For a masked parameter: which slices along ``dim`` the mask keeps any entry of."""
        return self.masks[value.index].kept(value.dim(dim))

    def add_mask(self, value: TensorValue, pattern: MaskPattern) -> None:
        self.masks[value.index] = pattern

    def mask_pattern(self, value: TensorValue) -> Optional[MaskPattern]:
        """The :class:`~speedup.masks.MaskPattern` of a parameter's mask, ``None`` when it has none."""
        return self.masks.get(value.index)

    def set_const(self, value: TensorValue, dim: int, consts: Optional[DimConst]) -> None:
        d = value.dim(dim)
        if not value.consts:
            value.consts = [_UNSET] * value.ndim
        if consts is not None and not consts.any():
            consts = None
        value.consts[d] = consts

    def uniform(self, value: TensorValue) -> Optional[float]:
        """The single value the whole tensor holds for every input, if there is one."""
        if value.index not in self._uniform:
            self._uniform[value.index] = self._find_uniform(value)
        return self._uniform[value.index]

    def _find_uniform(self, value: TensorValue) -> Optional[float]:
        if value.data is not None and not value.follows_sizes:
            data = value.host()
            if data.numel() == 0 or data.is_complex():  # constants are real numbers here
                return None
            low, high = data.min(), data.max()
            return float(low) if bool(low == high) and bool(torch.isfinite(low)) else None
        for d in range(value.ndim):
            consts = self.const(value, d)
            if consts is not None and bool(consts.mask.all()):
                values = consts.value
                if bool((values == values[0]).all()):
                    return float(values[0])
        return None

    # -- demand -----------------------------------------------------------------------------

    def is_demanded(self, value: TensorValue) -> bool:
        return value.demand is not None

    def demanded(self, value: TensorValue, dim: int) -> torch.Tensor:
        """Boolean per entry: some consumer needs the slice at this index. Do not modify it in place."""
        d = value.dim(dim)
        if value.demand is None:
            return _filled(value.shape[d], False)
        mask = value.demand[d]
        return _filled(value.shape[d], True) if mask is None else mask

    def _prunable(self, value: TensorValue, d: int) -> bool:
        return bool(value.atoms) and value.atoms[d] is not None

    def demand_all(self, value: TensorValue) -> None:
        value.demand = [None] * value.ndim

    def demand(self, value: TensorValue, masks: Optional[dict[int, torch.Tensor]] = None) -> None:
        """Needs the entries selected by ``masks`` (dimension -> boolean); unnamed dimensions whole."""
        ndim, atoms = len(value.shape), value.atoms
        new: list = [None] * ndim
        if masks and atoms:
            for dim, mask in masks.items():
                d = dim + ndim if dim < 0 else dim
                if atoms[d] is not None:  # a dimension that keeps its size is needed whole
                    new[d] = mask
        if value.demand is None:
            value.demand = new
            return
        value.demand = [
            None if old is None or add is None else old if old is add else old | add
            for old, add in zip(value.demand, new)
        ]

    def keep(self, value: TensorValue, dim: int, mask: torch.Tensor) -> None:
        """Needs the entries of one dimension selected by ``mask``, saying nothing of the others.

        For a parameter whose dimensions belong to different groups (a projection's rows are heads,
        its columns hidden features), or for the one dimension an operator indexes: ``demand`` would
        need every unnamed dimension whole.
        """
        d = value.dim(dim)
        if not self._prunable(value, d):
            return
        if value.demand is None:
            value.demand = [_filled(n, False) for n in value.shape]
        current = value.demand[d]
        value.demand[d] = None if current is None else current | mask

    def _where(self) -> str:
        return self._node.describe() if self._node is not None else "analysis"


_FILLED: dict[tuple[int, bool], torch.Tensor] = {}


def _filled(n: int, flag: bool) -> torch.Tensor:
    """A shared all-True or all-False vector (callers never modify demand masks in place)."""
    mask = _FILLED.get((n, flag))
    if mask is None:
        mask = _FILLED[(n, flag)] = torch.full((n,), flag, dtype=torch.bool)
    return mask


def numeric_const(data: torch.Tensor, dim: int) -> Optional[DimConst]:
    """Exact constant entries of a tensor whose data is known (a parameter, a computed constant)."""
    if data.numel() == 0 or data.dim() == 0:
        return None
    flat = data.detach().movedim(dim, 0).reshape(data.shape[dim], -1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if not (flat.is_floating_point() or flat.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        return None
    high = flat.amax(1)
    low = flat.amin(1)
    mask = high == low
    if flat.is_floating_point():
        mask &= torch.isfinite(high)
    if not bool(mask.any()):
        return None
    return DimConst.where(mask, high.to(torch.float64))
