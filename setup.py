"""flowsolve: fast, verified samplers for diffusion and flow-matching models.

``kernels/`` sits at the top level of the repository but installs as ``flowsolve.kernels``: a
top-level import package named ``kernels`` would collide with another PyPI distribution.
"""
from setuptools import setup

setup(
    name="flowsolve",
    version="0.1.0",
    description="Fast, verified samplers for diffusion and flow-matching models, with fused Triton kernels.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["flowsolve", "flowsolve.solvers", "flowsolve.adapters", "flowsolve.kernels", "bench", "bench.peers"],
    package_dir={"flowsolve.kernels": "kernels"},
    install_requires=[
        "torch>=2.3",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # peers for agreement tests and side-by-side benchmarks; none of them pins torch beyond what
        # 2.13.0 satisfies. k-diffusion itself is installed with --no-deps (see README): its
        # dependencies include torchvision, which would replace torch.
        "test": ["pytest", "hypothesis", "pytest-benchmark", "scipy", "tqdm", "matplotlib",
                 "diffusers", "torchdiffeq", "torchsde"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "scipy"],
        "peers": ["diffusers", "torchdiffeq", "torchsde", "scipy", "tqdm"],
    },
    entry_points={"console_scripts": ["flowsolve-bench=bench.__main__:main"]},
)
