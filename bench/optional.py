"""The benchmark's optional packages (peft, lycoris-lora, transformers, pyfastkron, curvlinops,
nngeometry, vllm): each imported once with the parts the benchmark uses, and the real reason
when one cannot be used."""
import functools
import importlib


@functools.cache
def optional_import(module: str, *names: str) -> tuple[object | None, str | None]:
    """``(module, None)`` when ``module`` imports and provides every attribute in ``names``
    (for a lazy package such as transformers, getting them is what imports its parts); else
    ``(None, why)``: "not installed" only when the package itself is absent, otherwise the
    error the import raised (a package that is installed but broken is not "absent")."""
    try:
        imported = importlib.import_module(module)
        for name in names:
            getattr(imported, name)
    except ModuleNotFoundError as e:
        if e.name is not None and module.split(".")[0] == e.name.split(".")[0]:
            return None, f"{e.name} is not installed"
        return None, f"{module} failed to import: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 (any failure of an optional import is reported)
        return None, f"{module} failed to import: {type(e).__name__}: {e}"
    return imported, None


def load_peft():
    """(peft, None) or (None, why)."""
    return optional_import("peft", "__version__", "get_peft_model", "set_peft_model_state_dict",
                           "LoKrConfig", "LoraConfig")


def load_lycoris():
    """(lycoris.modules.lokr, None) with its LoKr module, or (None, why)."""
    return optional_import("lycoris.modules.lokr", "LokrModule")


def load_transformers():
    """(transformers, None) with its LLaMA classes, or (None, why)."""
    return optional_import("transformers", "LlamaConfig", "LlamaForCausalLM")


def load_fastkron():
    """(pyfastkron's torch module, None) or (None, why)."""
    return optional_import("pyfastkron.fastkrontorch", "gemkm")


def load_curvlinops():
    """(curvlinops, None) with its K-FAC operator, or (None, why)."""
    return optional_import("curvlinops", "KFACLinearOperator")


def load_vllm():
    """(vllm, None) with its offline engine and LoRA requests, or (None, why)."""
    vllm, why = optional_import("vllm", "LLM", "SamplingParams")
    if vllm is None:
        return None, why
    request, why = optional_import("vllm.lora.request", "LoRARequest")
    return (None, why) if request is None else (vllm, None)


def load_nngeometry():
    """(nngeometry.object, None) with its K-FAC matrix and parameter vectors, or (None, why)."""
    return optional_import("nngeometry.object", "PMatKFAC", "PVector")


def skipped() -> list[str]:
    """One line per optional provider that cannot run here: which rows are skipped, and why."""
    rows = [("LLaMA training-step and serving", load_transformers()),
            ("PEFT LoKr/LoRA", load_peft()),
            ("LyCORIS LoKr", load_lycoris()), ("FastKron", load_fastkron()),
            ("curvlinops penalty", load_curvlinops()),
            ("nngeometry penalty", load_nngeometry()), ("vLLM serving", load_vllm())]
    return [f"the {what} rows are skipped: {why}" for what, (module, why) in rows if module is None]
