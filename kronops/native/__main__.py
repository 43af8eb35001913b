"""``python -m kronops.native build``: build the native library and install it into the
package; ``python -m kronops.native status``: whether it is loaded, and why not, and the
instruction-set level its kernels use."""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kronops.native",
                                description="The kronops native CPU library.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build it with CMake against the installed torch and "
                                     "install it into the package")
    b.add_argument("--build-dir", default=None, help="CMake build directory "
                                                     "(default: build/native/<build key> in the checkout)")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    sub.add_parser("status", help="whether the library is loaded, and why not")
    args = p.parse_args(argv)
    if args.command == "build":
        from .build import build
        try:
            build(args.build_dir, args.jobs)
        except RuntimeError as e:
            print(f"kronops native library: {e}", file=sys.stderr)
            return 1
        return 0
    import kronops  # noqa: F401  (loads the library once the ops are defined)
    from . import available, cpu_isa, detected_isa, library_path, load_error
    from .build import runner_path
    print(f"loaded: {library_path()}" if available() else f"not loaded: {load_error()}")
    if available():
        print(f"instruction sets: {cpu_isa()} (this CPU: {detected_isa()}; KRONOPS_CPU_ISA)")
    if available() and os.path.exists(runner_path()):
        print(f"C++ runner: {runner_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
