"""The kronops benchmark suite: every op against naive PyTorch references and the hardware limit.

Run ``python -m bench`` (CPU shapes) or ``python -m bench --full`` (GPU shapes); see bench/README.md.
"""
