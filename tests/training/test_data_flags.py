"""``--split`` and ``--data-path`` mean the same thing on the command line and in the dataset builder:
one parser (data/utils.py) decides what is valid, and equivalent spellings build the same splits."""
import numpy
import pytest

from megatron_alcot.arguments import parse_args, validate_args
from megatron_alcot.config import ConfigError
from megatron_alcot.data.builder import build_train_valid_test_datasets
from megatron_alcot.data.indexed_dataset import IndexedDatasetBuilder
from megatron_alcot.data.tokenizers import build_tokenizer
from megatron_alcot.data.utils import parse_blend, parse_split

from _tiny import tiny_argv

SPLITS = ["969,30,1", "969 30 1", "969/30/1", "969:30:1", " 98 , 1 , 1 ", "1", "2,1", "0,1,0",
          "0,0,0", "1,-1", "a,b", "1,2,3,4", "", "inf,1", "1,,1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = numpy.random.default_rng(0)
    prefixes = []
    for name in ("a", "b"):
        prefix = str(tmp_path_factory.mktemp("data") / f"{name}_text_document")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
        for _ in range(1000):         # 0.1% of the sequences for the test split is one
            builder.add_document(rng.integers(1, 120, size=int(rng.integers(5, 40))).tolist() + [0])
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def _cli(corpus, data_path, split):
    args = parse_args(tiny_argv(mock_data=False, split=split) + ["--data-path", *data_path])
    validate_args(args, world_size=1)
    return args


def _accepts(fn, *a):
    try:
        fn(*a)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("split", SPLITS)
def test_split_is_valid_on_the_command_line_exactly_when_the_parser_accepts_it(corpus, split):
    expected = _accepts(parse_split, split)
    got = _accepts(_cli, corpus, [corpus[0]], split)
    assert (got is None) == (expected is None), (got, expected)
    if expected is not None:
        assert got == expected          # the same message, from the same parser


@pytest.mark.parametrize("pattern", [["30", "A", "70", "B"], ["A", "B"], ["A"], ["0.5", "A"],
                                     ["A", "30", "B"], ["30", "A", "B"], ["-1", "A", "2", "B"],
                                     ["0", "A", "0", "B"], ["30", "A", "70", "5"]])
def test_data_path_is_valid_on_the_command_line_exactly_when_the_parser_accepts_it(corpus, pattern):
    values = [{"A": corpus[0], "B": corpus[1]}.get(v, v) for v in pattern]
    expected = _accepts(parse_blend, values, "--data-path")
    got = _accepts(_cli, corpus, values, "969,30,1")
    assert (got is None) == (expected is None), (got, expected)
    if expected is not None:
        assert got == expected


def _samples(args):
    tok = build_tokenizer("NullTokenizer", vocab_size=args.data.vocab_size)
    datasets = build_train_valid_test_datasets(args.data, seq_length=16, seed=3, num_samples=(40, 20, 10),
                                               tokenizer=tok)
    return [None if ds is None else numpy.stack([ds[i]["tokens"].numpy() for i in range(len(ds))])
            for ds in datasets]


@pytest.mark.parametrize("data_path", [["A"], ["30", "A", "70", "B"]])
def test_equivalent_spellings_build_the_same_samples(corpus, data_path, tmp_path):
    values = [{"A": corpus[0], "B": corpus[1]}.get(v, v) for v in data_path]
    reference = None
    for i, split in enumerate(["969,30,1", "969 30 1", "969/30/1", "9690:300:10"]):
        args = _cli(corpus, values, split)
        args.data.data_cache_path = str(tmp_path / f"cache{i}")
        samples = _samples(args)
        if reference is None:
            reference = samples
            assert all(s is not None for s in samples)
        for got, want in zip(samples, reference):
            numpy.testing.assert_array_equal(got, want)
