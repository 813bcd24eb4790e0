import json

import numpy as np
import pytest

from megatron_alcot.data.tokenizers import (TOKENIZER_TYPES, GPTSentencePieceTokenizer, HuggingFaceTokenizer,
                                            Llama2Tokenizer, NullTokenizer, SentencePieceTokenizer, TokenizerError,
                                            build_tokenizer)
from sp_fixture import sample_texts, train_tiny_model

TEXTS = ["Hello world, the quick brown fox 12345.", "", "Second line\nwith a newline", "ünïcödé ☃ text"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("sp") / "tok.model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_texts(60_000), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    return d


@pytest.mark.parametrize("cls_name", ["SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"])
def test_sentencepiece_types(sp_model, cls_name):
    import sentencepiece

    tok = build_tokenizer(cls_name, tokenizer_model=sp_model)
    assert type(tok).__name__ == cls_name
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert tok.vocab_size == 400 and tok.eod == 2 and tok.eos == 2 and tok.bos == 1 and tok.pad == -1
    ids = tok.tokenize(TEXTS[0])
    assert ids == sp.encode(TEXTS[0]) and ids[0] != tok.bos  # no BOS/EOS added
    assert tok.detokenize(ids) == TEXTS[0]
    assert tok.tokenize_batch(TEXTS, num_threads=2) == [sp.encode(t) for t in TEXTS]
    arrays = tok.tokenize_batch_arrays(TEXTS, num_threads=1)
    assert [a.tolist() for a in arrays] == [sp.encode(t) for t in TEXTS]
    assert all(a.dtype == np.int32 for a in arrays)
    assert tok.detokenize(tok.tokenize(TEXTS[3])) == TEXTS[3]  # byte fallback round-trips unseen chars


def test_huggingface_tokenizer_dir_and_file(hf_dir):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
        assert isinstance(tok, HuggingFaceTokenizer)
        assert tok.eod == 2 and tok.bos == 1 and tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        ids = tok.tokenize(TEXTS[0])
        assert ids == ref.encode(TEXTS[0]).ids and ids[0] == 1  # post-processor adds <s>
        assert tok.tokenize_batch(TEXTS) == [ref.encode(t).ids for t in TEXTS]
        assert tok.tokenize_batch(TEXTS, num_threads=1) == [ref.encode(t).ids for t in TEXTS]
        assert tok.detokenize(ids[1:]) == TEXTS[0]


def test_huggingface_without_eos(tmp_path, hf_dir):
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    data["model"]["vocab"].pop("</s>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="eos_token"):
        tok.eod


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert tok.tokenize("3 4  5\n6") == [3, 4, 5, 6] and tok.eod == 99 and tok.vocab_size == 100
    assert tok.detokenize([1, 2]) == "1 2"
    assert tok.tokenize_batch(["1", "2 3"]) == [[1], [2, 3]]
    with pytest.raises(TokenizerError, match="outside"):
        tok.tokenize("100")
    with pytest.raises(TokenizerError, match="integers"):
        tok.tokenize("a b")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_errors_name_the_flag(tmp_path, hf_dir):
    with pytest.raises(TokenizerError, match="--tokenizer-type 'Bogus' is unknown") as info:
        build_tokenizer("Bogus", tokenizer_model="x")
    for name in TOKENIZER_TYPES:
        assert name in str(info.value)
    with pytest.raises(TokenizerError, match="--tokenizer-model .*not found"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(TokenizerError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


def test_classes_are_distinct_names(sp_model):
    assert {SentencePieceTokenizer.name, Llama2Tokenizer.name, GPTSentencePieceTokenizer.name} == set(TOKENIZER_TYPES[:3])
