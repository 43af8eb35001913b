"""The ``vllm.general_plugins`` entry point: ``register()`` teaches vLLM's LoRA machinery the
kronops adapter kinds. vLLM calls it in every process it starts (engine core, workers),
possibly more than once; it changes things the first time only.

It patches these private vLLM names (``PATCHED``; not API, so vLLM is pinned to
``TESTED_VLLM`` and ``check_internals`` names any that moved):

- ``vllm.lora.utils._all_lora_classes``: our subclasses of the linear LoRA layers
  (``layers``) put in front, so ``from_layer`` picks them;
- ``WorkerLoRAManager.__init__``: also keeps the model config (where the checkpoint is);
- ``WorkerLoRAManager._load_adapter``: a LoRA path that is a kronops adapter file, a
  directory holding one, or a PEFT LoKr checkpoint (``loader.is_kronops_path``) is loaded by
  ``loader`` as a ``LoRAModel`` without LoRA tensors carrying our updates;
- ``LoRAModelManager._create_merged_loras_inplace``: nothing to pack for such a model;
- ``LoRAModelManager.activate_adapter``: once vLLM gave an adapter its slot, every kronops
  layer's slot is cleared and gets that adapter's updates per output slice, and the
  manager's Punica wrappers (``punica_wrapper_mapping``) learn whether the slot holds a
  kronops adapter (``routing.mark_slot``);
- ``PunicaWrapperBase.update_metadata``: also builds the step's token grouping
  (``routing``);
- ``LLMEngine.add_request`` / ``AsyncLLM.add_request`` (the front ends): a request naming an
  adapter not loaded before has it loaded first, so a bad one is refused with the reason
  instead of stopping the engine (``frontend``).
"""
import warnings

TESTED_VLLM = "0.32.0"
ATTRIBUTE = "kronops"  # the LoRAModel attribute holding {vLLM module: {slice: update}}
PATCHED = ("vllm.lora.utils._all_lora_classes", "vllm.lora.utils.from_layer",
           "vllm.lora.worker_manager.WorkerLoRAManager.__init__",
           "vllm.lora.worker_manager.WorkerLoRAManager._load_adapter",
           "vllm.lora.model_manager.LoRAModelManager._create_merged_loras_inplace",
           "vllm.lora.model_manager.LoRAModelManager.activate_adapter",
           "vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA._apply_lora_to_output",
           "vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase.update_metadata",
           "vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase.token_lora_indices",
           "vllm.v1.engine.llm_engine.LLMEngine.add_request",
           "vllm.v1.engine.llm_engine.LLMEngine.add_lora",
           "vllm.v1.engine.async_llm.AsyncLLM.add_request",
           "vllm.v1.engine.async_llm.AsyncLLM.add_lora")

_registered = False


def check_internals() -> None:
    """RuntimeError naming the patched vLLM names this vLLM lacks."""
    import importlib
    missing = []
    for dotted in PATCHED:
        parts = dotted.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    if missing:
        raise RuntimeError(f"kronops' vLLM plugin was written for vllm {TESTED_VLLM} and this "
                           f"vLLM lacks {missing}: install vllm {TESTED_VLLM} to serve kronops "
                           "adapter files")


def register() -> None:
    """Install the patches (see the module docstring); a no-op after the first call. A vLLM
    lacking a patched name gets a warning naming it and no patches (vLLM runs, kronops
    adapter files are not served): kronops installs this entry point wherever it is
    installed, so it must not stop another vLLM from starting."""
    global _registered
    if _registered:
        return
    import vllm
    if vllm.__version__ != TESTED_VLLM:
        warnings.warn(f"kronops' vLLM plugin is tested with vllm {TESTED_VLLM}, not "
                      f"{vllm.__version__}; it patches private vLLM names", stacklevel=2)
    try:
        check_internals()
    except RuntimeError as e:  # vLLM itself keeps working, without kronops adapters
        warnings.warn(f"{e}; kronops adapters are not served", stacklevel=2)
        _registered = True
        return
    import vllm.lora.utils as lora_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    from . import frontend, layers, loader, routing

    classes = lora_utils._all_lora_classes
    if not any(issubclass(c, layers.KronopsLinearMixin) for c in classes):
        linear = [c for c in classes if issubclass(c, BaseLinearLayerWithLoRA)]
        lora_utils._all_lora_classes = layers.subclasses(linear) + tuple(classes)

    init = WorkerLoRAManager.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        self._kronops_model_config = vllm_config.model_config

    load_adapter = WorkerLoRAManager._load_adapter

    def _load_adapter(self, lora_request):
        if not loader.is_kronops_path(lora_request.lora_path):
            return load_adapter(self, lora_request)
        model = LoRAModel(lora_request.lora_int_id, 1, {})
        setattr(model, ATTRIBUTE, loader.load(self._adapter_manager, self._kronops_model_config,
                                             lora_request.lora_path))
        return model

    merge = LoRAModelManager._create_merged_loras_inplace

    def _create_merged_loras_inplace(self, lora_model):
        if not lora_model.loras and hasattr(lora_model, ATTRIBUTE):
            return  # a kronops adapter: no LoRA tensors to pack
        return merge(self, lora_model)

    activate = LoRAModelManager.activate_adapter

    def activate_adapter(self, lora_id):
        changed = activate(self, lora_id)
        if changed:
            index = self.lora_index_to_id.index(lora_id)
            model = self._registered_adapters[lora_id]
            updates = getattr(model, ATTRIBUTE, None) or {}
            unknown = sorted(name for name in updates if not isinstance(
                self.modules.get(name), layers.KronopsLinearMixin))
            if unknown:
                raise RuntimeError(f"kronops adapter {lora_id} has updates for {unknown[:3]}, "
                                   "which are not kronops LoRA layers of this model")
            for name, module in self.modules.items():
                if isinstance(module, layers.KronopsLinearMixin):
                    module.kronops_clear(index)
                    for slice_index, update in updates.get(name, {}).items():
                        module.kronops_set(index, slice_index, update)
            for wrapper in self.punica_wrapper_mapping.values():
                routing.mark_slot(wrapper, index, hasattr(model, ATTRIBUTE))
        return changed

    WorkerLoRAManager.__init__ = __init__
    WorkerLoRAManager._load_adapter = _load_adapter
    LoRAModelManager._create_merged_loras_inplace = _create_merged_loras_inplace
    LoRAModelManager.activate_adapter = activate_adapter
    routing.install(PunicaWrapperBase)
    frontend.install(LLMEngine, AsyncLLM)
    _registered = True
