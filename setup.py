"""binwslt: Triton kernels for binary-weight spiking lottery tickets (BinW-SLT)."""
from setuptools import setup

setup(
    name="binwslt",
    version="0.1.0",
    description="Fused Triton kernels and a PyTorch API for binary-weight spiking lottery tickets",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ is installed as binwslt.kernels: a top-level `kernels` would collide with the PyPI package of that name.
    packages=["binwslt", "binwslt.kernels"],
    package_data={"binwslt": ["csrc/*.cpp", "csrc/*.h"]},
    package_dir={"binwslt": "binwslt", "binwslt.kernels": "kernels"},
    install_requires=[
        "torch>=2.3",
        "numpy",
        "triton>=3.3; platform_system == 'Linux'",
        "ninja",  # torch's cpp_extension builds the fused CPU LIF scan with it
        "tqdm",
        "matplotlib",
        "safetensors",
        "scikit-learn",
        "nir",  # binwslt.export / `binwslt export --nir`
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ray>=2.9"],  # ray: the reproduce grid's Ray test
        "ray": ["ray>=2.9"],  # binwslt reproduce fans its runs out as Ray tasks (without it: one run at a time)
    },
    entry_points={"console_scripts": ["binwslt=binwslt.cli:main"]},
)
