"""Image folders for colorization training.

A data directory is either flat (images directly inside: one class, named after the
directory) or has one subfolder per class. Any image PIL can open is accepted and turned
into 8-bit sRGB (grayscale, palette, RGBA/LA over white, CMYK, 16-bit, EXIF orientation).
Files that cannot be opened are found when the folder is indexed and skipped with one
warning; a file that becomes unreadable later is skipped at load time (another sample is
returned in its place), so an epoch never crashes on one bad file.

Samples are dicts: ``L`` (1, S, S) in 0..100 and ``ab`` (2, S/stride, S/stride) in Lab
units (``stride`` 4 for :class:`~fastcolor.models.ZhangNet`, 1 for
:class:`~fastcolor.models.FusionNet`; reduced by :func:`reduce_target`, subsampled by
default as Zhang et al. do), plus ``index`` and, with an embedding cache (no augmentation
only), ``embedding``. The loss gets ab values, never 313-bin vectors. The run-time
augmentation (:func:`augmentation`) fills the uncovered border from the nearest edge pixel,
as Keras' ``ImageDataGenerator`` does.

Modules (everything public is re-exported here):

- :mod:`fastcolor.data.images`: one file -> upright 8-bit RGB (PIL), with the read checks;
- :mod:`fastcolor.data.folder`: listing a data folder, the split and its provenance;
- :mod:`fastcolor.data.transforms`: the ab target's reduction and the augmentation;
- :mod:`fastcolor.data.dataset`: :class:`ColorizationDataset`, what the trainer reads;
- :mod:`fastcolor.data.decode`: a batch of files' bytes -> uint8 squares on the device (nvjpeg
  on CUDA, PIL for what it refuses), for ``decode="gpu"``;
- :mod:`fastcolor.data.device`: :class:`DeviceStage`, the batched device half (crop, mirror,
  augmentation, Lab, target) of the uint8 worker path;
- :mod:`fastcolor.data.prior`: the class prior: from the data, a seeded sample, or the authors'
  ImageNet prior (a fact table);
- :mod:`fastcolor.data.shards`: tar shards in the WebDataset format: :func:`write_shards`, and
  :class:`ShardDataset`, split by rank and worker (reading needs the ``shards`` extra).
"""
from fastcolor.data.dataset import OUTPUTS, ColorizationDataset
from fastcolor.data.decode import DECODES, collate_bytes, decode_batch, read_bytes, resolve_decode
from fastcolor.data.device import CropMirror, DeviceStage, OnDevice, TaggedCollate, lab_batch
from fastcolor.data.folder import (
    ImageItem,
    Listing,
    NoReadableImagesError,
    files_fingerprint,
    folder_times,
    index_images,
    list_folder,
    list_images,
    load_split,
    save_split,
    scan_images,
    split_change,
    split_current,
    split_items,
    split_source,
)
from fastcolor.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    check_pixel_limit,
    draft_jpeg,
    file_kind,
    load_l,
    load_rgb,
    load_square,
    open_image,
)
from fastcolor.data.prior import compute_class_prior, imagenet_prior, parse_prior, prior_of_batches, sample_items
from fastcolor.data.shards import (
    SHARD_INDEX,
    Shard,
    ShardDataset,
    ShardError,
    is_shard_source,
    read_shard_index,
    resolve_shards,
    sample_shards,
    write_shards,
)
from fastcolor.data.transforms import FILL_MODES, TARGET_REDUCTIONS, Augmentation, augmentation, reduce_target

__all__ = ["IMAGE_EXTENSIONS", "ImageItem", "UnreadableImageError", "NoReadableImagesError", "check_pixel_limit",
           "open_image", "file_kind", "load_rgb", "load_l", "list_images", "scan_images", "index_images", "split_items",
           "save_split", "load_split", "files_fingerprint", "split_source", "split_change", "ColorizationDataset",
           "augmentation", "Augmentation", "FILL_MODES", "load_square", "TARGET_REDUCTIONS", "reduce_target",
           "draft_jpeg", "OUTPUTS", "DECODES", "read_bytes", "resolve_decode", "collate_bytes", "decode_batch",
           "lab_batch", "CropMirror", "DeviceStage", "SHARD_INDEX", "Shard", "ShardError", "ShardDataset",
           "write_shards", "read_shard_index", "resolve_shards", "is_shard_source", "sample_shards",
           "TaggedCollate", "OnDevice", "Listing", "list_folder", "folder_times", "split_current",
           "compute_class_prior", "prior_of_batches", "imagenet_prior", "parse_prior", "sample_items"]
