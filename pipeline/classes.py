"""Class lists and split names: the data contracts every other module relies on."""
from __future__ import annotations

# FER2013's own index order (the CSV's `emotion` column). Folder names map onto it;
# alphabetical folder order would silently swap labels.
FER2013_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# FER+ relabelling (fer2013new.csv column order, without `unknown` and `NF`).
FERPLUS_CLASSES: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger",
                                    "disgust", "fear", "contempt")

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Side of a FER2013 face in pixels: what the shards store and every face crop is resized to.
FACE_SIZE = 48

# FER2013's `Usage` -> our split. Image-folder downloads carry Usage as a file-name prefix.
USAGE_TO_SPLIT: dict[str, str] = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def folder_class_index(name: str) -> int | None:
    """Index of a class folder name (any case) in FER2013 order, or None if unknown."""
    try:
        return FER2013_CLASSES.index(name.lower())
    except ValueError:
        return None


# RAF-DB "basic" labels 1..7 (EmoLabel/list_patition_label.txt), in RAF-DB's own order: label - 1.
RAFDB_CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")

# Split folder names of an image-folder data set (any case) -> our split.
SPLIT_FOLDERS: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                                 "test": "test"}
