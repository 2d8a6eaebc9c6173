"""The toy world's cache: the generated dataset and the pretrained tiny CLIP, each in a folder named by a hash of its
settings under the cache root, written atomically (a temporary folder renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict

from .clip_pretraining import ClipSettings, pretrain_clip
from .scenes import CLASS_NAMES, SEEN_NAMES, STUFF_IDS, THING_IDS, UNSEEN_IDS, WorldSettings, build_dataset


def write_atomically(final: str, write) -> None:
    """Run `write(tmp_folder)` and rename the folder to `final`; a folder another process finished first wins."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(final):  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_cache_root() -> str:
    """`$DISA_TOY_CACHE`, else ~/.cache/disa/toy_world."""
    return os.environ.get("DISA_TOY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "disa", "toy_world"))


def ensure_toy_clip(settings: ClipSettings, cache_root: str | None = None, progress: bool = True) -> str:
    """Folder of the tiny CLIP for these settings: loaded from the cache, or pretrained and written atomically."""
    final = os.path.join(cache_root or default_cache_root(), f"clip-{settings.key()}")
    if not os.path.isfile(os.path.join(final, "toy_clip_pretraining.json")):
        write_atomically(final, lambda tmp: pretrain_clip(settings, tmp, progress))
    return final


def ensure_world_dataset(settings: WorldSettings, cache_root: str | None = None) -> str:
    """Folder of the world's `save_to_disk` DatasetDict for these settings (generated and written atomically)."""
    final = os.path.join(cache_root or default_cache_root(), f"world-{settings.key()}")
    if not os.path.isfile(os.path.join(final, "world.json")):

        def write(tmp):
            build_dataset(settings).save_to_disk(tmp)
            with open(os.path.join(tmp, "world.json"), "w") as fh:
                json.dump(
                    {
                        "settings": asdict(settings),
                        "class_names": CLASS_NAMES,
                        "seen_names": SEEN_NAMES,
                        "unseen_names": [CLASS_NAMES[i] for i in UNSEEN_IDS],
                        "stuff_names": [CLASS_NAMES[i] for i in STUFF_IDS],
                        "thing_names": [CLASS_NAMES[i] for i in THING_IDS],
                    },
                    fh,
                    indent=1,
                )

        write_atomically(final, write)
    return final
