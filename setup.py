from setuptools import setup

# torch is a lower bound only: install the wheel you need first (CPU: `pip install torch==2.13.0`), otherwise pip
# resolves a multi-GB CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.6",
    # 5.23 is the first release that works: up to 5.20 configs reject plain classes in `sub_configs_defaults`
    # ("CLIPTextConfig has no attribute create_subconfig"), and up to 5.22 processors read
    # `ProcessingKwargs._defaults`, which DiSaProcessorKwargs does not define (defaults are processor class attributes
    # since 5.23). Tested with 5.23.0, 5.24.0 and 5.25.0. No upper bound: no release is known to break the package.
    "transformers>=5.23",
    "huggingface_hub>=1.31",
    "safetensors>=0.8",
    "tokenizers>=0.23",
    "numpy>=1.24",
    "pillow>=10",
]
TRAIN = [
    "accelerate>=1.10",
    "albumentations>=2.0.8",  # random crop, SSD colour jitter, flip; cv2 (its dependency) is also imported directly
    "datasets>=4.0",
    "opencv-python-headless>=4.9",
    "pyyaml>=6",
    "tqdm>=4.66",
]
# scipy: Pascal Context .mat files; OpenCV: ADE-847's resize, the official preparation's cv2.resize calls
EVAL = ["datasets>=4.0", "evaluate>=0.4.6", "pyyaml>=6", "tqdm>=4.66", "scipy>=1.10", "opencv-python-headless>=4.9"]
DEMO = ["gradio>=6,<7"]  # space/app.py
BENCH = ["matplotlib>=3.8"]  # benchmarks/: plots of the comparison and cost figures
# gradio_client drives the demo over HTTP, selenium drives it in headless Chromium (Debian: chromium, chromium-driver)
DEMO_TESTS = ["gradio_client>=2", "selenium>=4.20"]

setup(
    name="modeling-disa",
    version="0.1.0",
    description="DiSa / CAT-Seg open-vocabulary semantic segmentation for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["modeling_disa", "modeling_disa.model", "modeling_disa.evaluation", "modeling_disa.hub"],
    # Everything the package reads at run time is inside it (tests/test_wheel_install.py checks an installed wheel).
    package_data={
        "modeling_disa": ["presets/disa-tiny/*.json"],  # the offline demo's preset (a copy by make_presets.py)
        "modeling_disa.evaluation": ["definitions/*.json", "disa_mean_iou/*.py"],
        "modeling_disa.hub": ["model_card.md"],  # a link to the top-level card: the wheel gets the file
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "train": TRAIN,
        "eval": EVAL,
        "demo": DEMO,
        "bench": TRAIN + BENCH,
        "test": sorted(set(TRAIN + EVAL + DEMO + DEMO_TESTS + BENCH + ["pytest>=8"])),
    },
)
