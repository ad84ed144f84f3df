"""cleannet_tf: CleanNet (Lee et al., CVPR 2018) for TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="cleannet_tf",
    version="0.1.0",
    description=(
        "CleanNet: transfer learning for label-noise detection and "
        "sample weighting, in TensorFlow 2 / Keras 3, with SavedModel export."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cleannet_tf", "cleannet_tf.*", "tools"]),
    install_requires=[
        # tensorflow, not tensorflow-cpu: tensorflow-serving-api depends on it.
        "tensorflow>=2.16,<2.22",
        "keras>=3.3,<4",
        "numpy>=1.26,<3",
        # 1.11 removes SVC(probability=True), which the SVM baseline of
        # BENCHMARKS.md's figures uses (baselines._svm).
        "scikit-learn>=1.3,<1.11",
        "scipy>=1.10,<2",  # also a dependency of scikit-learn
        "absl-py>=2.0,<3",
        # tf.summary needs it; tensorflow 2.21 no longer installs it.
        "tensorboard>=2.16,<3",
        "tensorflow-datasets>=4.9,<5",
        "tensorflow-serving-api>=2.16,<2.22",
    ],
    extras_require={
        # pytest-xdist: `make test` runs the tests in two processes.
        "test": ["pytest>=7", "pytest-xdist>=3.2"],
        # Only the benchmarks use these (cleanlab: a detection baseline;
        # matplotlib: BENCHMARKS.md's figures); without them they are skipped.
        "benchmark": ["cleanlab>=2.6,<3", "matplotlib>=3.7,<4"],
    },
    entry_points={
        "console_scripts": [
            "cleannet-demo=tools.demo:run",
            "cleannet-convert=tools.convert_features:run",
            "cleannet-train=tools.train_cleannet:run",
            "cleannet-score=tools.score:run",
            "cleannet-train-classifier=tools.train_classifier:run",
            "cleannet-extract=tools.extract_features:run",
            "cleannet-build-references=tools.build_references:run",
            "cleannet-cifar10n-features=tools.cifar10n_features:run",
            "cleannet-train-alternating=tools.train_alternating:run",
            "cleannet-review=tools.review_report:run",
            "cleannet-benchmark-detection=tools.benchmark_detection:run",
            "cleannet-benchmarks=tools.benchmarks:run",
            "cleannet-export=tools.export_savedmodel:run",
            "cleannet-serving-client=tools.serving_client:run",
        ],
    },
)
