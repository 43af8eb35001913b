"""kronops.serving.vllm's plugin and routing without an engine: register() is idempotent and
puts one subclass of each linear LoRA layer first; a step's route groups tokens by slot,
never adapts tokens without an adapter (-1) or padding rows, and is built once per
update_metadata call; it skips vLLM's LoRA term where no token's slot holds a vLLM LoRA."""
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

from kronops.serving.vllm import layers, plugin, routing  # noqa: E402


def test_register_twice_patches_once():
    import vllm.lora.utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine
    plugin.register()
    classes, update = lora_utils._all_lora_classes, PunicaWrapperBase.update_metadata
    adds = LLMEngine.add_request, AsyncLLM.add_request
    plugin.register()
    assert lora_utils._all_lora_classes == classes and PunicaWrapperBase.update_metadata is update
    assert (LLMEngine.add_request, AsyncLLM.add_request) == adds
    assert all(add._kronops and not add.__wrapped__.__dict__.get("_kronops") for add in adds)
    ours = [c for c in classes if issubclass(c, layers.KronopsLinearMixin)]
    linear = [c for c in classes if issubclass(c, BaseLinearLayerWithLoRA) and c not in ours]
    assert classes[:len(ours)] == tuple(ours)  # tried first by from_layer
    assert [c.__mro__[2] for c in ours] == linear  # one per linear LoRA layer, in order
    assert all(c.__name__ == "Kronops" + c.__mro__[2].__name__ for c in ours)


def test_a_step_route_groups_tokens_by_slot_and_pads_with_no_adapter():
    wrapper = SimpleNamespace(token_lora_indices=torch.tensor([-1, 2, 2, 0, -1, 2]))
    routing.update(wrapper)
    route = routing.step_route(wrapper, 8)  # two padding rows
    groups = route.groups(8, 1, (0, 1, 2), torch.device("cpu"))
    assert groups.tokens.tolist() == [3, 1, 2, 5]
    assert groups.offsets == [0, 1, 1, 4]
    assert groups.starts == [3, -1, -1]
    assert routing.step_route(wrapper, 8) is route  # built once per step and row count
    wrapper.token_lora_indices = torch.tensor([1, 1])
    routing.update(wrapper)
    assert routing.step_route(wrapper, 2).groups(2, 1, (1,), torch.device("cpu")).offsets \
        == [0, 2]


def test_a_step_runs_vllms_lora_term_only_where_a_token_holds_a_vllm_lora():
    wrapper = SimpleNamespace(token_lora_indices=torch.tensor([-1, 2, 0, 2]))
    assert routing.step_has_lora(wrapper)  # no route yet: vLLM's term runs
    routing.update(wrapper)
    assert routing.step_has_lora(wrapper)  # no slot marked: each may hold a LoRA
    routing.mark_slot(wrapper, 0, True)
    routing.mark_slot(wrapper, 2, True)
    routing.update(wrapper)
    assert not routing.step_has_lora(wrapper)  # kronops slots and no adapter only
    routing.mark_slot(wrapper, 2, False)  # slot 2 taken over by a vLLM LoRA
    routing.update(wrapper)
    assert routing.step_has_lora(wrapper)
    wrapper.token_lora_indices = torch.tensor([-1, 0, -1])
    routing.update(wrapper)
    assert not routing.step_has_lora(wrapper)


def test_a_layer_without_a_route_says_the_plugin_did_not_run():
    with pytest.raises(RuntimeError, match="register\\(\\) did not run in this process"):
        routing.step_route(SimpleNamespace(), 3)


def test_the_patched_vllm_internals_exist():
    assert vllm.__version__ == plugin.TESTED_VLLM
    plugin.check_internals()


def test_a_vllm_without_the_patched_names_warns_and_is_left_alone(monkeypatch):
    monkeypatch.setattr(plugin, "PATCHED", plugin.PATCHED + ("vllm.lora.utils.no_such_name",))
    with pytest.raises(RuntimeError, match=r"lacks \['vllm.lora.utils.no_such_name'\]"):
        plugin.check_internals()
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.warns(UserWarning, match="no_such_name.*kronops adapters are not served"):
        plugin.register()
