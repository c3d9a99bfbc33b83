"""benchmarks/compile_report.py: the SASS counts it gates on, and one real ahead-of-time compile (no GPU needed)
showing the conv grad-input GEMM runs on bf16 tensor cores (HGMMA, or HMMA for tiles under 64 rows, on sm_90;
HMMA on sm_80) with no FFMA loop."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("compile_report_sass", ROOT / "benchmarks" / "compile_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SASS = """
        /*0a70*/                   LDGDEPBAR ;                                       /* 0x00000000000079af */
        /*0a80*/                   DEPBAR.LE SB0, 0x1 ;                               /* 0x000080000000791a */
        /*0a90*/               @!P2 STS.U8 [R50+UR7], R31 ;                          /* 0x0081e40008000007 */
        /*0aa0*/                   HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR16].tnspB, R24 ;   /* 0x0 */
        /*0ab0*/                   HGMMA.64x64x16.F32.BF16 R24, R60, gdesc[UR16].tnspB, R24 ;   /* 0x0 */
        /*0ac0*/                   IGMMA.64x64x32.S8.S8 R24, gdesc[UR4], R24 ;       /* 0x0 */
        /*0ad0*/                   FFMA R1, R2, R3, R4 ;                              /* 0x0 */
        /*0ae0*/                   FFMA.FTZ R1, R2, R3, R4 ;                          /* 0x0 */
        /*0af0*/                   DEPBAR.LE SB0, 0x3 ;                               /* 0x0 */
        /*0b00*/                   STS.128 [R1], R4 ;                                 /* 0x0 */
"""


def test_sass_counts():
    counts = _report().sass_counts(SASS)
    assert counts["mma"] == {"HGMMA.64x64x16.F32.BF16": 2, "IGMMA.64x64x32.S8.S8": 1}
    assert counts["ffma"] == 2 and counts["sts_u8"] == 1 and counts["depbar"] == 3
    assert counts["instructions"] == 10
    assert _report().sass_counts("")["depbar"] is None


def test_ctas_per_sm():
    report = _report()
    assert report.ctas_per_sm(90, 255, 0, 8) == 1  # 256 regs x 256 threads = the whole register file
    assert report.ctas_per_sm(90, 64, 0, 4) == 8  # 64 regs x 128 threads: 8 CTAs (8192 each)
    assert report.ctas_per_sm(80, 32, 100000, 4) == 1  # shared memory bound


def test_grad_input_gemm_on_tensor_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    name = "conv_grad_input_kernel[fp32,3x3,split=True,"
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--module", "conv_lif_bwd",
                           "--filter", name, "--jobs", "1", "--json", str(out), "--keep-cubins", str(tmp_path / "cub")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert rows and {r["arch"] for r in rows} == {80, 90}
    for row in rows:
        assert {"kernel", "config", "arch", "gemm", "regs", "spill_bytes", "smem_bytes", "mma", "ffma", "sts_u8",
                "cubin"} <= row.keys()
        assert row["gemm"] and row["spill_bytes"] == 0 and row["ffma"] < 64
        opcodes = "".join(row["mma"])
        assert "HMMA" in opcodes or (row["arch"] == 90 and "HGMMA" in opcodes)  # tiles under 64 rows: mma.sync
        assert "BF16" in opcodes
        assert (tmp_path / "cub" / row["cubin"]).stat().st_size > 0
    assert any("HGMMA" in "".join(r["mma"]) for r in rows if r["arch"] == 90)  # the 64-row tiles: wgmma


def test_absent_tensors_compile_as_constexpr_none(tmp_path):
    """A launch passes an absent tensor as None and the kernel's flag follows from it (kernels/optional.py); the
    compile specs describe that launch the way Triton specialises it (type "constexpr", value None), and
    ASTSource compiles it for sm_80 and sm_90 with the flag's path gone (no load of the residual)."""
    from binwslt.kernels.specs import compile_specs

    by_name = {spec["name"]: spec for _, spec in compile_specs(["linear_lif_kernels"])}
    base = "linear_lif_scan_kernel[y=fp32,out=fp32,direct=True,res={},hard=True,decay_input=False]"
    without, with_res = by_name[base.format(False)], by_name[base.format(True)]
    assert without["signature"]["res_ptr"] == "constexpr" and without["constexprs"]["res_ptr"] is None
    assert without["constexprs"]["HAS_RES"] is False and "res_ptr" not in without["divisible_by_16"]
    assert with_res["signature"]["res_ptr"] == "*fp32" and with_res["constexprs"]["HAS_RES"] is True
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--module",
                           "linear_lif_kernels", "--filter", base.split("res=")[0], "--jobs", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["name"], r["arch"]): r for r in json.loads(out.read_text())}
    assert {(spec["name"], arch) for spec in (without, with_res) for arch in (80, 90)} <= rows.keys()
    for arch in (80, 90):
        assert rows[without["name"], arch]["instructions"] < rows[with_res["name"], arch]["instructions"]
