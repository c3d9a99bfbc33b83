"""benchmarks/roofline.py writes the modelled VGG-11 table (Markdown + JSON) from the model's own layer shapes."""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import roofline  # noqa: E402


def test_roofline_table(tmp_path):
    out = tmp_path / "roof.md"
    assert roofline.main(["--timesteps", "2", "--batch", "8", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    layers = {r["layer"] for r in rows}
    assert len(layers) == 10 and all(r["seconds"] > 0 for r in rows)
    first = [r for r in rows if r["layer"].startswith("vgg11.0 ") and r["side"] == "binwslt"]
    assert not any("grad-input" in r["kernel"] for r in first)  # the image needs no gradient
    # a GEMM row is priced at its ceiling or at HBM, whichever is slower
    gemm = next(r for r in rows if "grad-input GEMM" in r["kernel"])
    assert gemm["seconds"] >= gemm["ops"] / data["ceilings"]["bf16"]
    assert gemm["seconds"] >= gemm["bytes"] / data["hbm_bytes_per_s"]
    assert "| **total** |" in out.read_text()
