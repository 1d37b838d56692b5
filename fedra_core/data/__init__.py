"""Datasets of the project: the built-in benchmark, image-folder loaders and client partitioning."""

from fedra_core.data.builtin import (
    BUILTIN_DOMAINS,
    BUILTIN_MEAN,
    BUILTIN_STD,
    DIGIT_CLASSES,
    SHAPE_CLASSES,
    DomainData,
    ImageTensorDataset,
    builtin_digits,
    save_builtin_preview,
    synthetic_shapes,
)
from fedra_core.data.folders import (
    DOMAINNET_DOMAINS,
    NICOPP_DOMAINS,
    ImageFileDataset,
    load_domainnet,
    load_image_folder_domains,
    load_nicopp,
    read_split_file,
)
from fedra_core.data.partition import (
    ClientShard,
    partition_dirichlet,
    partition_feature_skew,
    shard_dataset,
    stratified_subset,
)

__all__ = [
    "BUILTIN_DOMAINS",
    "BUILTIN_MEAN",
    "BUILTIN_STD",
    "DIGIT_CLASSES",
    "DOMAINNET_DOMAINS",
    "NICOPP_DOMAINS",
    "SHAPE_CLASSES",
    "ClientShard",
    "DomainData",
    "ImageFileDataset",
    "ImageTensorDataset",
    "builtin_digits",
    "load_domainnet",
    "load_image_folder_domains",
    "load_nicopp",
    "partition_dirichlet",
    "partition_feature_skew",
    "read_split_file",
    "save_builtin_preview",
    "shard_dataset",
    "stratified_subset",
]
