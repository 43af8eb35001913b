"""Which tokens of a vLLM step each adapter slot adapts, built once per step.

vLLM keeps one Punica wrapper per model, shared by every LoRA layer; its
``update_metadata`` runs once per step, outside the model's forward pass, and leaves
``token_lora_indices``: per token of the step its LoRA slot, -1 for none. ``install()`` wraps
that method so that it also leaves a ``kronops.serving.routes.Route`` over those slots on the
wrapper (one host copy of the indices per step). Layers then take their token groups and
tile tables from it (``step_route``); the route caches them per member list, so layers
that share their members share one grouping, and no layer reads the indices itself.

The step also says whether any token's slot holds a vLLM LoRA (``step_has_lora``): the
plugin marks the slots it fills with kronops adapters (``mark_slot``), whose LoRA factors
are zero, so a step whose tokens hold only kronops adapters (or none) skips vLLM's LoRA term.
"""
import torch

from ..routes import Route

ATTRIBUTE = "_kronops_route"
KRONOPS_SLOTS = "_kronops_slots"  # on the wrapper: the slots holding kronops adapters


class StepRoute:
    """The slots of one step's tokens (host int64, -1: no adapter) and a ``Route`` over
    them per number of rows a layer gets (more rows than tokens: padding, which no adapter
    adapts). ``has_lora``: whether a token's slot is not one of ``kronops_slots``."""

    def __init__(self, slots: torch.Tensor, kronops_slots=frozenset()):
        self.slots = slots
        self.has_lora = not set(slots.unique().tolist()) <= {-1, *kronops_slots}
        self._routes = {}

    def route(self, rows: int) -> Route:
        if rows not in self._routes:
            slots = self.slots[:rows]
            if rows > slots.numel():
                slots = torch.cat([slots, slots.new_full((rows - slots.numel(),), -1)])
            self._routes[rows] = Route(slots)
        return self._routes[rows]


def update(wrapper) -> None:
    """Give ``wrapper`` (a Punica wrapper whose metadata were just updated) this step's
    ``StepRoute``."""
    setattr(wrapper, ATTRIBUTE,
            StepRoute(wrapper.token_lora_indices.to("cpu", torch.int64).clone(),
                      getattr(wrapper, KRONOPS_SLOTS, frozenset())))


def mark_slot(wrapper, index: int, kronops: bool) -> None:
    """Record on ``wrapper`` whether slot ``index`` now holds a kronops adapter (zero LoRA
    factors) or not (a vLLM LoRA); read by the next ``update``."""
    slots = set(getattr(wrapper, KRONOPS_SLOTS, ()))
    (slots.add if kronops else slots.discard)(index)
    setattr(wrapper, KRONOPS_SLOTS, frozenset(slots))


def step_has_lora(wrapper) -> bool:
    """Whether vLLM's LoRA term must run this step: True unless this step's route says that
    no token's slot holds a vLLM LoRA (also True before any route was built)."""
    step = getattr(wrapper, ATTRIBUTE, None)
    return step is None or step.has_lora


def step_route(wrapper, rows: int) -> Route:
    """The ``Route`` of this step for a layer input of ``rows`` rows."""
    step = getattr(wrapper, ATTRIBUTE, None)
    if step is None:
        raise RuntimeError("no kronops route for this step: the Punica wrapper's "
                           "update_metadata was not wrapped (kronops.serving.vllm.plugin."
                           "register() did not run in this process)")
    return step.route(rows)


def install(wrapper_class) -> None:
    """Wrap ``wrapper_class.update_metadata`` (once) so that it also calls ``update``."""
    original = wrapper_class.update_metadata
    if getattr(original, "_kronops", False):
        return

    def update_metadata(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        update(self)
        return result

    update_metadata._kronops = True
    wrapper_class.update_metadata = update_metadata
