"""Optional tensor arguments of the Triton kernels: a launcher passes ``None`` for a tensor a call does not have
(residual, spike counter, statistics, a gradient nobody asked for, ...) and the kernel's constexpr flag for that
path is derived from it here, by ``@triton.heuristics``, never passed by hand.

Triton specialises a ``None`` argument as a ``constexpr`` None, so each combination of present tensors compiles
once, exactly like the flags did; an ahead-of-time compile (kernels/specs.py, benchmarks/compile_report.py)
describes an absent tensor the same way: signature type ``"constexpr"``, constexpr value ``None``
(:func:`absent_for`).
"""
import triton


def _given(arg):
    return lambda args: args[arg] is not None


def optional_tensors(**flags):
    """Decorator (above ``@triton.jit``): ``FLAG="arg"`` or ``FLAG=("arg", "other", ...)`` sets the constexpr FLAG
    to whether ``arg`` was passed (not None). The other names are tensors the kernel reads only under FLAG: a launch
    passes them None together with ``arg``. The table is kept as ``kernel.optional_args`` for the compile specs."""
    table = {flag: (args,) if isinstance(args, str) else tuple(args) for flag, args in flags.items()}

    def wrap(kernel):
        wrapped = triton.heuristics({flag: _given(args[0]) for flag, args in table.items()})(kernel)
        wrapped.optional_args = table
        return wrapped

    return wrap


def jit_function(kernel):
    """The ``@triton.jit`` function under a kernel's decorators (the kernel itself when it has none)."""
    while isinstance(kernel, (triton.runtime.Heuristics, triton.runtime.Autotuner)):
        kernel = kernel.fn
    return kernel


def absent_for(kernel, constexprs):
    """The tensor arguments a launch passes as None for the flag values in ``constexprs`` (a compile spec's), as
    ``{arg: None}``; checks that the kernel's heuristics derive those very flag values from them."""
    table = getattr(kernel, "optional_args", {})
    absent = {arg: None for flag, args in table.items() if not constexprs[flag] for arg in args}
    for flag, derive in getattr(kernel, "values", {}).items():
        args = {arg: (None if arg in absent else True) for names in table.values() for arg in names}
        if derive(args) != bool(constexprs[flag]):
            raise ValueError(f"{flag}={constexprs[flag]} is not what the heuristics derive from {sorted(absent)}")
    return absent


__all__ = ["optional_tensors", "jit_function", "absent_for"]
