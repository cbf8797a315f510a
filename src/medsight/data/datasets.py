"""A torch Dataset over a SampleTable: decode, preprocess, and (for small images) decode once.

Images up to ``cache_max_side`` pixels are kept in memory after their first decoding, already
preprocessed, so epochs after the first cost no file reading or decoding; the cache is per
process, so DataLoader workers each fill their own (use ``persistent_workers=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medsight.data.imaging import DEFAULT_MAX_PIXELS, MIN_SIDE, decode
from medsight.data.sources import class_names
from medsight.data.transforms import Preprocess
from medsight.errors import DataError, ImageDecodeError

UNLABELLED = -1


class ImageDataset(Dataset):
    """``(image tensor, class index)`` pairs for the rows of ``table``; with a
    :class:`~medsight.data.volumes.VolumePreprocess`, ``(volume tensor (C, X, Y, Z), index)``.

    ``classes`` fixes the label → index mapping (a run's ``classes.json``); rows without a label
    get index ``-1``; a label outside ``classes`` is an error naming it. ``augment`` sees the
    resized image in ``[0, 1]`` after the cache (so cached epochs still get fresh augmentation),
    before normalisation. Images below ``min_side`` pixels on a side are refused (one line naming
    the file): upscaled to the input size they hold nothing to learn.

    >>> ds = ImageDataset(table, Preprocess(size=(64, 64)))    # doctest: +SKIP
    >>> x, y = ds[0]; x.shape                                   # doctest: +SKIP
    torch.Size([1, 64, 64])
    """

    def __init__(
        self,
        table: pd.DataFrame,
        preprocess: Preprocess,
        classes: Sequence[str] | None = None,
        *,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache_max_side: int = 128,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = MIN_SIDE,
        targets: np.ndarray | None = None,
    ) -> None:
        self.table = table.reset_index(drop=True)
        self.preprocess = preprocess
        self.classes_ = list(classes) if classes is not None else class_names(table)
        self.augment = augment
        self.max_pixels = max_pixels
        self.min_side = min_side
        #: 3: the rows are volumes (:func:`~medsight.data.volumes.read_volume`), whose
        #: preprocessing is a :class:`~medsight.data.volumes.VolumePreprocess`.
        self.dims = int(getattr(preprocess, "dims", 2))
        self.volume_index = table.attrs.get("volume")
        # Volumes are cached up to half the side (64³ voxels, 1 MiB each, by default).
        limit = cache_max_side // 2 if self.dims == 3 else cache_max_side
        self._cacheable = max(preprocess.size) <= limit
        self._cache: dict[int, np.ndarray] = {}
        if targets is not None:  # the task's own targets (multi-hot rows of findings...)
            self.targets = np.asarray(targets)
            return
        index = {name: i for i, name in enumerate(self.classes_)}
        unknown = sorted(set(self.table["label"].dropna()) - set(index))
        if unknown:
            raise DataError(
                f"label(s) {unknown} are not among the classes {self.classes_}; "
                "train on data that includes them or relabel"
            )
        self.targets = np.array(
            [index[label] if label is not None else UNLABELLED for label in self.table["label"]],
            dtype=np.int64,
        )

    @property
    def caches(self) -> bool:
        """Whether decoded images are kept in memory (images no larger than ``cache_max_side``)."""
        return self._cacheable

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        array = self._cache.get(i)
        if array is None and self.dims == 3:
            from medsight.data.volumes import read_volume

            source = self.table.at[i, "source"]
            volume = read_volume(source, volume=self.volume_index, max_pixels=self.max_pixels)
            array = self.preprocess.prepare(volume)
            if self._cacheable:
                self._cache[i] = array
        if array is None:
            image = decode(
                self.table.at[i, "source"],
                max_pixels=self.max_pixels,
                **self.preprocess.decode_options(),
            )
            height, width = image.size
            if min(height, width) < self.min_side:
                raise ImageDecodeError(
                    image.source,
                    f"{width}x{height} pixels is below the minimum of {self.min_side} on each "
                    "side for training; replace the image or leave it out (medsight data check "
                    "lists them all)",
                )
            array = self.preprocess.prepare(image)
            if self._cacheable:
                self._cache[i] = array
        tensor = torch.from_numpy(array)
        target = self.targets[i]
        if getattr(self.augment, "takes_targets", False):  # boxes move with the image
            tensor, target = self.augment(tensor.clone(), torch.from_numpy(np.asarray(target)))
            return self.preprocess.normalize(tensor), target
        if self.augment is not None:
            tensor = self.augment(tensor.clone())
        if self.targets.ndim > 1:
            return self.preprocess.normalize(tensor), torch.from_numpy(np.asarray(target))
        return self.preprocess.normalize(tensor), int(target)

    def class_counts(self) -> np.ndarray:
        """Images per class, in ``classes_`` order (for class weights and balanced sampling);
        with multi-hot targets, ``(2, K)``: positives and negatives per finding (ignored
        entries are neither)."""
        if self.targets.ndim > 1:
            known = ~np.isnan(self.targets)
            positive = (np.nan_to_num(self.targets) == 1) & known
            return np.stack([positive.sum(axis=0), (known & ~positive).sum(axis=0)])
        labelled = self.targets[self.targets >= 0]
        return np.bincount(labelled, minlength=len(self.classes_))
