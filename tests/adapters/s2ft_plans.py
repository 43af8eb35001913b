"""S²FT plans the adapter tests share: a plan over both K/V groups of ``tiny_llama``, and
apply_adapters with a given plan."""
from kronops import adapters


def gqa_plan(model):
    """Heads spanning both K/V groups partially (1 of group 0, 2 of group 1), scattered channels."""
    plan = adapters.select(model, heads=2, channels=4, seed=0)
    plan.blocks["model.layers.0"]["heads"] = [1, 3, 5]
    plan.blocks["model.layers.0"]["channels"] = [0, 7, 8, 39]
    plan.blocks["model.layers.1"]["heads"] = [2]
    return plan


def apply_s2ft(model, plan, **options):
    """apply_adapters with a given plan (mode, permute, delta_dtype in ``options``)."""
    adapters.apply_adapters(model, "s2ft", plan=plan, verbose=False, **options)
    return model
