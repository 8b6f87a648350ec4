"""open_clip's own trainer (``open_clip_train.main``) with this project's model configs registered.

``python -m training.open_clip_main ARGS`` is ``python -m open_clip_train.main ARGS`` (the same
arguments, the same behaviour), except that ``--model`` may also name a config of
``models/model_configs`` (``curation-tiny``): stock open_clip only knows its built-in ones. Curated
shards are WebDataset tars with a ``sizes.json`` in open_clip's format, so ``--train-data
'<run>/curated/<policy>/{000000..000003}.tar' --dataset-type webdataset`` reads them as they are,
and ``--train-num-samples`` may be left out when the brace pattern names exactly the listed shards.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Register our model configs, then hand every argument to open_clip_train unchanged."""
    from models.clip import register_model_configs

    register_model_configs()
    from open_clip_train.main import main as open_clip_train_main

    open_clip_train_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
