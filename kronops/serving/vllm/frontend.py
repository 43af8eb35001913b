"""A LoRA request's adapter loaded before the request reaches the engine, so that a bad one
is refused with the reason and the engine keeps serving.

vLLM loads a request's adapter in the worker during the step that first schedules it; an
error there (a missing path, a file for another base model, a corrupt file, KronA^B, ...)
stops the engine. ``install()`` wraps the front ends' ``add_request`` (``LLMEngine``:
``LLM.generate`` and friends; ``AsyncLLM``: the OpenAI server) so that a request naming an
adapter the front end has not seen first asks the engine to load it (``add_lora``, vLLM's
own call, which the OpenAI server's ``/v1/load_lora_adapter`` also makes). That runs the
worker's loader (kronops' or vLLM's) as a call that may fail: its error comes back to the
caller as ``ValueError`` naming the adapter and the reason, the request is not added, and
the engine is unharmed. An adapter that loaded once (same id and path) is not asked again.
"""
import functools
import inspect

CHECKED = "_kronops_checked_loras"  # the engine's set of (lora id, path) that loaded


def _lora_request(signature: inspect.Signature, args, kwargs):
    """The ``lora_request`` argument of an ``add_request(self, ...)`` call, or None."""
    return signature.bind_partial(*args, **kwargs).arguments.get("lora_request")


def _needs_check(engine, request) -> bool:
    return (request is not None and engine.vllm_config.lora_config is not None
            and (request.lora_int_id, request.lora_path) not in getattr(engine, CHECKED, ()))


def _refused(request, error: Exception) -> ValueError:
    return ValueError(f"LoRA request {request.lora_name!r} (id {request.lora_int_id}, path "
                      f"{request.lora_path!r}) refused: {error}")


def _checked(engine, request) -> None:
    if not hasattr(engine, CHECKED):
        setattr(engine, CHECKED, set())
    getattr(engine, CHECKED).add((request.lora_int_id, request.lora_path))


def install(sync_engine_class, async_engine_class) -> None:
    """Wrap ``add_request`` of vLLM's ``LLMEngine`` and ``AsyncLLM`` (once)."""
    sync_add = sync_engine_class.add_request
    if not getattr(sync_add, "_kronops", False):
        sync_signature = inspect.signature(sync_add)

        @functools.wraps(sync_add)
        def add_request(*args, **kwargs):
            engine, request = args[0], _lora_request(sync_signature, args, kwargs)
            if _needs_check(engine, request):
                try:
                    engine.add_lora(request)
                except Exception as e:
                    raise _refused(request, e) from None
                _checked(engine, request)
            return sync_add(*args, **kwargs)

        add_request._kronops = True
        sync_engine_class.add_request = add_request

    async_add = async_engine_class.add_request
    if not getattr(async_add, "_kronops", False):
        async_signature = inspect.signature(async_add)

        @functools.wraps(async_add)
        async def add_request_async(*args, **kwargs):
            engine, request = args[0], _lora_request(async_signature, args, kwargs)
            if _needs_check(engine, request):
                try:
                    await engine.add_lora(request)
                except Exception as e:
                    raise _refused(request, e) from None
                _checked(engine, request)
            return await async_add(*args, **kwargs)

        add_request_async._kronops = True
        async_engine_class.add_request = add_request_async
