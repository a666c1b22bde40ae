from setuptools import find_packages, setup

setup(
    name="dm_plugins",
    version="0.1.0",
    description="Capacity matching, pseudo-trajectory matching and pseudo-label matching (PTLM) "
                "as pluggy plugins for distribution-matching dataset distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # only the library is installed: `baselines/` and `adapters/` are the repository's research
    # harness and worked examples, run from a clone (`python baselines/dm.py`), and their
    # generic names would collide with other distributions in site-packages
    packages=find_packages(include=["dm_plugins", "dm_plugins.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<3",
        "torchvision>=0.16",
        "numpy>=1.22",
        "pluggy>=1.3",
        "tqdm>=4.60",
        "matplotlib>=3.5",  # curves.png, the report's and the ablation's figures
        # only for the embedded `digits` dataset (real 8x8 digits shipped inside scikit-learn),
        # which makes the quickstart work offline with no download
        "scikit-learn>=1.0",
    ],
    extras_require={"dev": ["pytest>=7", "mutmut==3.8.1; python_version >= '3.10'"]},
)
