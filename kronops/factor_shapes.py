"""Choosing Kronecker factor shapes: W (out, in) = A (a1, a2) (x) B (out/a1, in/a2)."""
import math


def near_sqrt_divisor(n: int) -> int:
    """The largest divisor of n that is at most sqrt(n) (1 for primes)."""
    for d in range(math.isqrt(n), 0, -1):
        if n % d == 0:
            return d
    return 1


def factor_shapes(in_features: int, out_features: int, a_shape=None):
    """((a1, a2), (b1, b2)) with a1*b1 = out_features and a2*b2 = in_features.

    ``a_shape=None`` picks a1, a2 as the divisors nearest below the square roots.
    """
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if a_shape is None:
        a_shape = (near_sqrt_divisor(out_features), near_sqrt_divisor(in_features))
    if (not isinstance(a_shape, (tuple, list)) or len(a_shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in a_shape)):
        raise ValueError(f"a_shape must be a pair of positive ints (a1, a2), got {a_shape!r}")
    a1, a2 = a_shape
    if out_features % a1 or in_features % a2:
        raise ValueError(f"a_shape {tuple(a_shape)} must divide (out_features, in_features) = "
                         f"({out_features}, {in_features})")
    return (a1, a2), (out_features // a1, in_features // a2)
