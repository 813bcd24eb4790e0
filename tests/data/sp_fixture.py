"""A tiny LLaMA-layout SentencePiece model trained on Python's help topics (about a second)."""
import io
import json


def sample_texts(n_chars=150_000):
    import pydoc_data.topics

    texts, total = [], 0
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key]
        texts.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return texts


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


def train_tiny_model(path, vocab_size=400):
    import sentencepiece as spm

    sentences = [line for t in sample_texts() for line in t.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.set_random_generator_seed(1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return str(path)
