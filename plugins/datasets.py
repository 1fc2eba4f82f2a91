"""Built-in datasets: the embedded digits, CIFAR-10, CIFAR-100 and ImageNet (local class folders)."""

from __future__ import annotations

from robustbench_kd.hookspecs import hookimpl


def _digits(config):
    from robustbench_kd.data.datasets import load_digits

    return load_digits()


def _cifar(name):
    def load(config):
        from robustbench_kd.data.datasets import load_cifar_splits

        return load_cifar_splits(name, config.data_dir, download=config.download, verify_md5=config.verify_md5)

    return load


def _imagenet(config):
    from robustbench_kd.data.imagenet import load_imagefolder_splits

    return load_imagefolder_splits("imagenet", config.data_dir, preprocessing=config.preprocessing or "Res256Crop224")


@hookimpl
def rbkd_register_datasets(registry):
    registry.add(
        "digits",
        _digits,
        description="scikit-learn's bundled 8x8 handwritten digits (1500 train / 297 test), no download",
    )
    registry.add("cifar10", _cifar("cifar10"), description="CIFAR-10 from data_dir (download=true to fetch)")
    registry.add("cifar100", _cifar("cifar100"), description="CIFAR-100 from data_dir (download=true to fetch)")
    registry.add(
        "imagenet",
        _imagenet,
        description="ImageNet from data_dir/train and data_dir/val class folders (val/ alone to evaluate), "
        "decoded lazily (RobustBench Res256Crop224; test = its 5000-image subset when present)",
    )
