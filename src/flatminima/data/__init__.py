"""flatminima.data: data sets as in-memory tensors, batched loaders and augmentation.

Readers for IDX (MNIST, Fashion-MNIST), CIFAR-10/100 pickles, Tiny ImageNet, scikit-learn digits,
and seeded synthetic sets (Gaussian mixture, teacher-student); :func:`load_dataset` turns any of
them into train / validation / test splits; :class:`TensorLoader` batches them on their device.
"""

from .augment import Augment, default_augment
from .cifar import read_cifar10, read_cifar100, read_cifar_batch
from .datasets import (
    ArrayDataset,
    DatasetNotFoundError,
    DataSplits,
    download_dataset,
    load_dataset,
)
from .download import DownloadError, download_file, verify_checksum
from .idx import read_idx, write_idx
from .loader import TensorLoader
from .sources import (
    DATASETS,
    data_home,
    describe_datasets,
    find_idx_files,
    how_to_obtain,
    locate_dataset,
)
from .synthetic import gaussian_mixture, teacher_student
from .tiny_imagenet import read_tiny_imagenet

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Augment",
    "DataSplits",
    "DatasetNotFoundError",
    "DownloadError",
    "TensorLoader",
    "data_home",
    "default_augment",
    "describe_datasets",
    "download_dataset",
    "download_file",
    "find_idx_files",
    "gaussian_mixture",
    "how_to_obtain",
    "load_dataset",
    "locate_dataset",
    "read_cifar10",
    "read_cifar100",
    "read_cifar_batch",
    "read_idx",
    "read_tiny_imagenet",
    "teacher_student",
    "verify_checksum",
    "write_idx",
]
