"""Every file name and path constant the docs name, in one place.

Relative paths are resolved against the current working directory, the way the
training page's commands are run (from the project root).
"""

CONFIG_EXAMPLE = "configs/base.toml"

DATA_DIR = "data"
PROCESSED_DIR = "data/processed"
META_TXT = "data/processed/meta.json"
META_BIN = "data/meta.json"
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.json"
META_FORMAT_VERSION = 2

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT = "checkpoints/ckpt_last.pt"
CHECKPOINT_BEST = "checkpoints/ckpt_best.pt"
LAST_NAME = "ckpt_last.pt"
BEST_NAME = "ckpt_best.pt"
# Under FSDP, each checkpoint names a folder of optimizer shards beside it: ckpt_shards-<iter>-<token>.
SHARDS_PREFIX = "ckpt_shards-"
TRAIN_LOG_NAME = "train_log.json"
METRICS_NAME = "metrics.jsonl"
# The branch of [hub] repo_id that a run with [hub] push_checkpoints keeps its files on.
HUB_CHECKPOINTS_BRANCH = "checkpoints"

TROUBLESHOOTING = "docs/troubleshooting.md"

# Data files `tinylm prepare --dataset` reads through `datasets` (suffix -> builder, what to call it),
# and the files a `save_to_disk` folder holds; `--input` refuses them as plain text.
DATASET_FILES = {".json": ("json", "JSON"), ".jsonl": ("json", "JSON Lines"), ".csv": ("csv", "CSV"),
                 ".parquet": ("parquet", "Parquet"), ".arrow": ("arrow", "Arrow")}
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
