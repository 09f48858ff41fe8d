from setuptools import find_packages, setup

setup(
    name="hope-kernels",
    version="0.1.0",
    description="Triton kernels for linear attention and the multi-timescale CMS memory of HOPE / Nested Learning models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hope_kernels*", "hope*", "benchmarks*"]),
    package_data={"hope": ["configs/*.yaml"]},
    install_requires=[
        # Any torch >= 2.3 will do: an installed CPU build is kept, never replaced by a CUDA one.
        "torch>=2.3",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist"],
        "bench": ["matplotlib"],
        "hf": ["transformers>=5.24", "safetensors"],
    },
    entry_points={
        "console_scripts": [
            "hope-train=hope.train:main",
            "hope-evaluate=hope.evaluate:main",
            "hope-hf=hope.hf:main",
        ]
    },
)
