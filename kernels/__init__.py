"""Triton kernels of binwslt (installed as ``binwslt.kernels``).

Modules: ``lif`` (shared LIF step helpers and the standalone lif op), ``subnet`` (ternary subnet
weights), ``linear_lif`` (fused linear + LIF), ``conv_lif`` (fused conv + LIF) and ``ops`` (the
backend entry used by ``binwslt.functional`` with backend="triton"). Submodules are imported on
demand so that importing this package does not compile or trace anything.
"""
