"""The kronops benchmark suite: every op against naive PyTorch references and the hardware limit.

Run ``python -m bench`` (CPU shapes) or ``python -m bench --full`` (GPU shapes); see bench/README.md.
"""
import os

# The profiler (host overhead, kernel totals) logs every start and stop at kineto's highest
# level (5, "USDT") on stderr; above it nothing is printed. Read when the profiler first
# starts; set KINETO_LOG_LEVEL yourself to see its messages.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
