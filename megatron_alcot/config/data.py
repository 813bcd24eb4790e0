"""DataConfig: where samples come from (Megatron's data flags, docs/data_format.md §3).

``--data-path`` and ``--split`` are kept as given; ``data/utils.py`` is their one parser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_alcot.config.fields import flag
from megatron_alcot.data.tokenizers import NEEDS_TOKENIZER_MODEL, TOKENIZER_TYPES


@dataclass
class DataConfig:
    """Where samples come from (Megatron's data flags, docs/data_format.md §3)."""

    data_path: list = flag(
        "--data-path", default_factory=list, metavar="[W] PREFIX",
        help="datasets PREFIX.bin/.idx, weighted by size, or a weighted blend w1 p1 w2 p2 ... "
             "(data/utils.py parses it)")
    split: str = flag("--split", default="969,30,1", metavar="TRAIN,VALID,TEST",
                      help="up to three weights that cut each dataset into train, valid and test sequences")
    train_data_path: list = flag("--train-data-path", default_factory=list, metavar="[W] PREFIX",
                                 help="the train split's own datasets or blend (exclusive with --data-path)")
    valid_data_path: list = flag("--valid-data-path", default_factory=list, metavar="[W] PREFIX",
                                 help="the valid split's own datasets or blend (with --train-data-path)")
    test_data_path: list = flag("--test-data-path", default_factory=list, metavar="[W] PREFIX",
                                help="the test split's own datasets or blend (with --train-data-path)")
    data_cache_path: Optional[str] = flag(
        "--data-cache-path", default=None, metavar="DIR",
        help="where sample index files are cached (default: cache/GPTDataset_indices beside the first dataset)")
    mock_data: bool = flag("--mock-data", default=False, help="synthetic random tokens instead of datasets")
    tokenizer_type: str = flag(
        "--tokenizer-type", default="NullTokenizer", choices=TOKENIZER_TYPES,
        help="tokenizer the datasets were written with (NullTokenizer: ids as they are, needs --vocab-size)")
    tokenizer_model: Optional[str] = flag(
        "--tokenizer-model", default=None, metavar="PATH",
        help="SentencePiece model file, or a Hugging Face tokenizer.json or directory holding one "
             "(every type but NullTokenizer)")
    vocab_size: Optional[int] = flag("--vocab-size", default=None,
                                     help="vocabulary size of --tokenizer-type NullTokenizer")
    reset_position_ids: bool = flag("--reset-position-ids", default=False,
                                    help="positions restart at 0 after every end-of-document token")
    reset_attention_mask: bool = flag("--reset-attention-mask", default=False,
                                      help="tokens attend only within their own document")
    eod_mask_loss: bool = flag("--eod-mask-loss", default=False,
                               help="no loss on predicting the end-of-document token")
    num_workers: int = flag("--num-workers", default=2, help="DataLoader worker processes per rank")
    mmap_bin_files: bool = flag(
        off="--no-mmap-bin-files", default=True,
        help="the .bin files are memory-mapped; --no-mmap-bin-files reads every sample from the file instead")
    mid_level_dataset_surplus: float = flag(
        "--mid-level-dataset-surplus", default=0.005,
        help="extra fraction of samples each blend component builds, so the blend never runs short")
