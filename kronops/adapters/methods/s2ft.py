"""S²FT: every transformer block (``blocks``: every supported family) trains the weight parts
of its selected query heads and FFN channels (``Block.selections``): rows of q/k/v and FFN-in
layers, columns of the attention output and FFN-out layers.

apply_adapters(model, "s2ft", plan=None, ratio=None, heads=None, channels=None,
strategy=None, seed=None, calibration=None, loss_fn=None, mode="adapter", permute=False,
delta_dtype=None): see ``Config``; target_modules must be None. The layers and what a file
holds for them: ``s2ft_layers``.
"""
import copy
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ...dtypes import accumulation_dtype
from ...s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ...s2ft.selection import Selection
from ...wrapped_linear import features, out_in_weight
from ..blocks import Block, find_blocks
from ..errors import AdapterFileError
from ..selection import Plan, check_plan, plan_selections, select
from ..state import AdapterState
from .s2ft_layers import check_layers, layer_tensors, wrap, write_tensors
from .updates import SparseUpdate

NAME = "s2ft"
LAYERS = (S2FTLinear,)  # S2FTInPlaceLinear is one
FILE_KEYS = ("plan", "mode")
MODES = ("adapter", "inplace")  # a trainable Δ per layer, or the weights trained in place
SELECTION_KEYS = ("ratio", "heads", "channels", "strategy", "seed", "calibration", "loss_fn")
DEFAULT_S2FT_RATIO = 0.05  # apply_adapters(model, "s2ft") with no selection: 5% of heads/channels


@dataclass(frozen=True)
class Config:
    """What S²FT trains and how.

    ``plan`` (a ``Plan`` from ``select``), or the selection itself: ``ratio`` (fraction of
    heads and of channels, in (0, 1]) or ``heads``/``channels`` (an int per block, or a
    fraction of the model total; given one, the other is 0), with ``strategy``, ``seed``,
    ``calibration``, ``loss_fn`` (``select``'s; None: its defaults). Not both ratio and
    heads/channels, nor plan and any of these. With none of plan, ratio, heads, channels:
    ratio=DEFAULT_S2FT_RATIO (5% of the model's query heads and of its FFN channels, chosen
    at random across blocks, at least one of each), the fraction the S²FT paper trains.
    ``mode``: "adapter" (``S2FTLinear``, a trainable Δ of ``delta_dtype``, None: fp32;
    mergeable) or "inplace" (``S2FTInPlaceLinear``: the selected rows/columns of the weight
    train in place with ``kronops.s2ft.InPlaceAdamW``/``InPlaceSGD``; a torch.optim optimizer
    given those parameters raises at its first step, before it changes anything).
    ``permute``: co-permute each block first so selections are contiguous
    (``permutation``; ``unpermute`` restores the original layout).
    """
    plan: Plan | None = None
    ratio: float | None = None
    heads: int | float | None = None
    channels: int | float | None = None
    strategy: str | None = None
    seed: int | None = None
    calibration: object = None
    loss_fn: object = None
    mode: str = "adapter"
    permute: bool = False
    delta_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.permute, bool):
            raise TypeError(f"permute must be a bool, got {self.permute!r}")
        if self.delta_dtype is not None:
            if self.mode == "inplace":
                raise ValueError("delta_dtype applies to mode='adapter' only (in-place S²FT "
                                 "trains the weight in its own dtype)")
            if not isinstance(self.delta_dtype, torch.dtype) or \
                    not self.delta_dtype.is_floating_point:
                raise TypeError(f"delta_dtype must be a floating-point torch.dtype, "
                                f"got {self.delta_dtype!r}")
        given = [k for k in SELECTION_KEYS if getattr(self, k) is not None]
        if self.plan is not None and given:
            raise ValueError(f"plan= is the selection: give it or {', '.join(SELECTION_KEYS)}, "
                             f"not both (got plan and {', '.join(given)})")
        if self.ratio is not None:
            both = [k for k in ("heads", "channels") if getattr(self, k) is not None]
            if both:
                raise ValueError("ratio is the fraction of heads and of channels: give ratio or "
                                 f"heads/channels, not both (got ratio and {', '.join(both)})")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or \
                    not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"ratio must be a fraction in (0, 1], got {self.ratio!r}")

    def select(self, model: nn.Module, blocks) -> Plan:
        """A copy of the given plan, checked against ``blocks``, or ``select``'s plan."""
        if self.plan is not None:
            check_plan(self.plan, blocks)
            return copy.deepcopy(self.plan)
        heads, channels = self.heads, self.channels
        if self.ratio is not None:
            heads = channels = float(self.ratio)
        if heads is None and channels is None:
            heads = channels = DEFAULT_S2FT_RATIO
        options = {k: getattr(self, k) for k in ("strategy", "seed", "calibration", "loss_fn")
                   if getattr(self, k) is not None}
        return select(model, heads=heads or 0, channels=channels or 0, **options)


@dataclass
class Spec:
    """Which S²FT layers go where: the ``plan``'s parts of the model's ``blocks``
    (``selections``: {module name: its ``Selection``}, original layout), in ``mode``; built
    co-permuted when ``permute``, with Δ in ``delta_dtype``."""
    plan: Plan
    mode: str
    blocks: list[Block]
    permute: bool = False
    delta_dtype: torch.dtype = torch.float32
    selections: dict[str, Selection] = field(init=False)

    def __post_init__(self):
        self.selections = plan_selections(self.blocks, self.plan)

    @property
    def modules(self) -> list[str]:
        """The adapted modules (what the base fingerprint covers)."""
        return list(self.selections)

    @property
    def touched(self) -> list[str]:
        """Every module the adapters use (train_modules must not overlap them)."""
        return self.modules

    @property
    def fixed(self) -> dict[str, torch.Tensor]:
        """File tensors with values fixed by the plan: each layer's indices."""
        return {f"{name}.{sel.side}": sel.indices() for name, sel in self.selections.items()}

    def expected(self, model: nn.Module) -> dict[str, torch.Size]:
        """The file tensors these layers need, with their exact shapes."""
        value = "delta" if self.mode == "adapter" else "weight"
        shapes = {}
        for name, sel in self.selections.items():
            in_features, out_features = features(model.get_submodule(name))
            shapes[f"{name}.{sel.side}"] = torch.Size([sel.count])
            shapes[f"{name}.{value}"] = torch.Size(sel.part_shape((out_features, in_features)))
        return shapes

    def apply(self, model: nn.Module, train_modules: list[str], base) -> AdapterState:
        """Build the S²FT layers (``s2ft_layers.wrap``); the state the model records."""
        permutations = wrap(model, self.blocks, self.plan, self.mode, self.permute,
                            self.delta_dtype)
        return AdapterState(NAME, list(train_modules), base=base, plan=self.plan,
                            mode=self.mode, permutations=permutations)

    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put the file's values into the built layers (``s2ft_layers.write_tensors``)."""
        write_tensors(model, tensors)

    @torch.no_grad()
    def serve(self, model: nn.Module, tensors: dict) -> dict[str, SparseUpdate]:
        """Per adapted module its ``SparseUpdate``, Δ in the module's weight dtype: the saved
        Δ (adapter mode), or the saved weights minus the model's (in-place mode; exact when
        both lie within a factor 2 of each other, Sterbenz)."""
        updates = {}
        for name, sel in self.selections.items():
            w = out_in_weight(model.get_submodule(name))
            sel = sel.to(w.device)
            if self.mode == "adapter":
                delta = tensors[f"{name}.delta"].to(w)
            else:
                wide = accumulation_dtype(w.dtype)
                saved = tensors[f"{name}.weight"].to(w.device, wide)
                delta = (saved - sel.part(w).to(wide)).to(w)
            updates[name] = SparseUpdate(sel, delta)
        return updates


def spec(model: nn.Module, config: Config, target_modules) -> Spec:
    """The parts of every block the configured selection trains."""
    if target_modules is not None:
        raise ValueError("method='s2ft' chooses its modules from the selection plan; "
                         "target_modules must be None")
    blocks = find_blocks(model)
    return Spec(config.select(model, blocks), config.mode, blocks, permute=config.permute,
                delta_dtype=config.delta_dtype or torch.float32)


def check_file(config: dict) -> None:
    """The file's plan (``Plan.from_dict``) and mode, well-formed."""
    Plan.from_dict(config["plan"])
    if config["mode"] not in MODES:
        raise AdapterFileError(f"mode {config['mode']!r}, expected one of {MODES}")


def read_spec(model: nn.Module, config: dict, tensors: dict, state: AdapterState | None) -> Spec:
    """The file's plan and mode, checked against ``model``: its blocks, and, in a model with
    S²FT layers, the same mode and the same selections (co-permuted or not). Δ (adapter
    mode) in the file's dtype."""
    plan, mode = Plan.from_dict(config["plan"]), config["mode"]
    try:
        blocks = find_blocks(model)
        check_plan(plan, blocks)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"the selection plan does not fit the model: {e}") from None
    deltas = sorted(f"{name}.delta" for name in plan_selections(blocks, plan)
                    if f"{name}.delta" in tensors)
    found = Spec(plan, mode, blocks,
                 delta_dtype=tensors[deltas[0]].dtype if deltas else torch.float32)
    if state is not None:
        if state.mode != mode:
            raise AdapterFileError(f"holds S²FT in {mode!r} mode, the model's S²FT layers are "
                                   f"in {state.mode!r} mode", whole_file=True)
        check_layers(model, found.selections)
    return found


def save(model: nn.Module, state: AdapterState) -> tuple[dict, dict]:
    """({"plan", "mode"}, per layer its indices and Δ or trained weights) for a file."""
    return dict(plan=json.loads(state.plan.to_json()), mode=state.mode), layer_tensors(model)


def mergeable(layers: dict[str, nn.Module], *, unload: bool) -> dict[str, nn.Module]:
    """Adapter-mode layers merge; in-place layers have nothing to merge (training changed the
    weights themselves): with ``unload`` none is merged, else a ValueError says so."""
    adapters = {n: m for n, m in layers.items() if not isinstance(m, S2FTInPlaceLinear)}
    if not adapters and not unload:
        raise ValueError("model has no S²FT adapter layers to merge: in-place S²FT trains the "
                         "weights themselves (nothing to merge or unmerge); "
                         "merge_adapters(model, unload=True) unwraps them")
    return adapters


def check_disable(layers: dict[str, nn.Module]) -> None:
    """In-place layers cannot be switched off: the trained weights are the base's."""
    inplace = [n for n, m in layers.items() if isinstance(m, S2FTInPlaceLinear)]
    if inplace:
        raise ValueError(f"in-place S²FT layers (e.g. {inplace[0]}) train the weights "
                         "themselves: there is no adapter to disable (keep a copy of the base "
                         "model, or use mode='adapter')")
