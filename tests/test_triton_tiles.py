"""The tile policy (kernels/tiles.py): one config per shape on CPU and under the interpreter, grids filled on a GPU
(narrower tiles for the fused forward and the linear GEMMs, a split pixel reduction for the conv grad-weight), and
every config a GPU launch can pick is one the compile report compiles (kernels/specs.py). Pure Python: compiles
nothing."""
import itertools

import pytest

pytest.importorskip("triton")

from binwslt.kernels import tiles  # noqa: E402
from binwslt.kernels.specs import compile_specs  # noqa: E402

H200_SMS, A100_SMS = 132, 108


def _programs(cfg, rows, cols):
    return -(-rows // cfg["BLOCK_M"]) * -(-cols // cfg["BLOCK_N"])


def test_grids_filled_on_a_gpu_only():
    # VGG-11's fc 2048->256 at N=128: 16 programs at the base 32x64 tile, 128 at 16x16.
    base = tiles.linear_forward_config(True, False, 128, 256, interpret=False)
    filled = tiles.linear_forward_config(True, False, 128, 256, interpret=False, sms=H200_SMS)
    assert _programs(base, 128, 256) == 16 and _programs(filled, 128, 256) == 128
    assert tiles.linear_forward_config(True, False, 128, 256, interpret=True, sms=H200_SMS) == \
        tiles.linear_forward_config(True, False, 128, 256, interpret=True)
    # a deep conv layer at a small batch: 64 programs at 64x64, 256 at 32x32; a large one keeps its tile
    conv = tiles.forward_config(True, 512, 512, 512, interpret=False, sms=H200_SMS)
    assert _programs(conv, 512, 512) >= H200_SMS and (conv["BLOCK_M"], conv["BLOCK_N"]) == (32, 32)
    assert tiles.forward_config(True, 64, 64, 131072, interpret=False, sms=H200_SMS) == \
        tiles.forward_config(True, 64, 64, 131072, interpret=False)
    # masked or analog paths keep their one config
    assert tiles.forward_config(True, 48, 48, 512, interpret=False, sms=H200_SMS) == \
        tiles.forward_config(True, 48, 48, 512, interpret=False)
    gemm = tiles.linear_gemm_config(256, 256, interpret=False, sms=H200_SMS)
    assert _programs(gemm, 256, 256) == 64 and gemm["BLOCK_M"] == gemm["BLOCK_N"] == 32
    assert _programs(tiles.linear_scan_config(128, 256, interpret=False, sms=H200_SMS), 128, 256) == 128


def test_grad_weight_split():
    # VGG-11's 256->256 3x3 layer at T=4, N=128: 144 tiles of 64x64, 32768 pixels: two splits fill 132 SMs twice
    assert tiles.grad_weight_split(144, 32768, 32, H200_SMS) == 2
    assert tiles.grad_weight_split(576, 8192, 32, H200_SMS) == 1
    assert tiles.grad_weight_split(18, 131072, 32, H200_SMS) == 15
    assert tiles.grad_weight_split(18, 1024, 32, H200_SMS) == 2  # each split keeps MIN_SPLIT_STEPS steps
    assert tiles.grad_weight_split(18, 131072, 32, None) == 1


def _launch(cfg):
    return ({k: v for k, v in cfg.items() if k.startswith(("BLOCK", "EVEN"))}, cfg["num_warps"], cfg["num_stages"])


def _compiled(kernel, arch=None):
    """The launch configs (as `_launch` gives them) the compile specs hold for ``kernel`` (for ``arch``: the specs
    compiled for that SM version)."""
    return [({k: v for k, v in s["constexprs"].items() if k.startswith(("BLOCK", "EVEN"))}, s["num_warps"],
             s["num_stages"]) for _, s in compile_specs()
            if s["fn"].__name__ == kernel and (arch is None or arch in s.get("archs", (arch,)))]


def compile_specs_fwd():
    """Per conv forward spec (in `_compiled`'s order): the element size of its x when that x holds spikes in a
    float dtype (2 or 4), else 1."""
    sizes = {"*fp32": 4, "*fp16": 2, "*bf16": 2}
    return [(None, sizes.get(s["signature"]["x_ptr"], 1) if s["constexprs"]["IS_SPIKE"] else 1)
            for _, s in compile_specs() if s["fn"].__name__ == "binary_conv_lif_fwd_kernel"]


@pytest.mark.parametrize("sms", [None, A100_SMS, H200_SMS])
def test_every_gpu_config_is_compiled(sms):
    sizes, rows = (3, 16, 32, 48, 64, 128, 256, 512, 2048), (16, 128, 512, 2048, 8192, 131072)
    fwd = _compiled("binary_conv_lif_fwd_kernel")
    for is_spike, ci, co, m in itertools.product((True, False), sizes, sizes, rows):
        assert _launch(tiles.forward_config(is_spike, ci, co, m, interpret=False, sms=sms)) in fwd, (ci, co, m)
    # spikes in a fused layer's float output (fp32, fp16/bf16): BLOCK_K 32 tiles, compiled with that x dtype
    float_fwd = {x_bytes: [(c, w, st) for (c, w, st), (_, s) in zip(fwd, compile_specs_fwd()) if s == x_bytes]
                 for x_bytes in (2, 4)}
    for x_bytes, ci, co, m in itertools.product((2, 4), sizes, sizes, rows):
        cfg = tiles.forward_config(True, ci, co, m, interpret=False, sms=sms, x_bytes=x_bytes)
        assert cfg["BLOCK_K"] == 32 and _launch(cfg) in float_fwd[x_bytes], (x_bytes, ci, co, m)
    lin = _compiled("binary_linear_lif_fwd_kernel")
    gi, gw = _compiled("linear_grad_input_kernel"), _compiled("linear_grad_weight_kernel")
    scan, bwd_scan = _compiled("linear_lif_scan_kernel"), _compiled("linear_lif_bwd_scan_kernel")
    for (is_spike, fp16), n, c in itertools.product(((True, False), (False, True), (False, False)), rows, sizes):
        assert _launch(tiles.linear_forward_config(is_spike, fp16, n, c, interpret=False, sms=sms)) in lin
        gemm = _launch(tiles.linear_gemm_config(n, c, interpret=False, sms=sms))
        assert gemm in gi and gemm in gw
        scan_cfg = _launch(tiles.linear_scan_config(n, c, interpret=False, sms=sms))
        assert scan_cfg in scan
        # the backward scan's saved-y specs carry the unused GEMM constexpr BLOCK_K (32)
        assert ({**scan_cfg[0], "BLOCK_K": 32},) + scan_cfg[1:] in bwd_scan
        # memory="recompute": the forward's tiles inside the backward scan
        assert _launch(tiles.linear_recompute_scan_config(is_spike, fp16, n, c, interpret=False, sms=sms)) in bwd_scan


@pytest.mark.parametrize("arch", [80, 90])
def test_grad_weight_configs_per_arch_are_compiled_for_their_arch(arch):
    """The grad-weight pipeline: 3 stages on tile-multiple layers, 8 warps for 64x32 tiles and up before sm_90 (at
    4 warps they spilled on sm_80); each per-arch config is compiled for the arch that picks it."""
    compiled = _compiled("conv_grad_weight_kernel", arch)
    for ci, co in itertools.product((3, 16, 32, 48, 64, 128, 512), repeat=2):
        cfg = tiles.grad_weight_config(ci, co, 10 ** 5, interpret=False, arch=arch)
        if ci % 64 == 0 and co % 64 == 0:
            assert (cfg["num_stages"], cfg["num_warps"]) == (3, 8 if arch == 80 else 4)
        assert _launch(cfg) in compiled, (ci, co, cfg)
