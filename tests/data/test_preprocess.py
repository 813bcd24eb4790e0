import gzip
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from megatron_alcot.data import preprocess_data as tool
from megatron_alcot.data.indexed_dataset import IndexedDataset
from megatron_reader import read_index, read_sequences
from sp_fixture import sample_texts, train_tiny_model, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("sp") / "tok.model")


@pytest.fixture(scope="module")
def texts():
    return sample_texts(120_000)


def run(capsys, *args):
    code = tool.main([str(a) for a in args])
    return code, capsys.readouterr().err


def sp_args(sp_model, inputs, prefix, *extra):
    return ["--input", *inputs, "--output-prefix", prefix, "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", sp_model, *extra]


def files_of(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_matches_tokenizer_and_megatron_layout(tmp_path, capsys, sp_model, texts):
    import sentencepiece

    src = write_jsonl(tmp_path / "in.jsonl", texts)
    code, err = run(capsys, *sp_args(sp_model, [src], tmp_path / "out", "--append-eod", "--log-interval", "10"))
    assert code == 0, err
    assert "docs/s" in err and "MB/s" in err and "ETA" in err
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    prefix = str(tmp_path / "out_text_document")
    assert read_sequences(prefix) == [sp.encode(t) + [2] for t in texts]
    idx = read_index(prefix + ".idx")
    assert idx["dtype_code"] == 8 and idx["document_indices"] == list(range(len(texts) + 1))


def test_workers_1_and_2_identical_with_small_chunks(tmp_path, capsys, sp_model, texts):
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        code, err = run(capsys, *sp_args(sp_model, [src], prefix, "--append-eod", "--workers", workers,
                                         "--chunk-bytes", 4096))
        assert code == 0, err
        outputs.append(files_of(f"{prefix}_text_document"))
    assert outputs[0] == outputs[1]


def test_gz_zst_and_glob_inputs_keep_order(tmp_path, capsys, sp_model, texts):
    import zstandard

    parts = [texts[:20], texts[20:40], texts[40:]]
    plain = write_jsonl(tmp_path / "all.jsonl", texts)
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "a.jsonl", parts[0])
    blob = "".join(json.dumps({"text": t}) + "\n" for t in parts[1]).encode()
    (tmp_path / "shards" / "b.jsonl.gz").write_bytes(gzip.compress(blob))
    blob = "".join(json.dumps({"text": t}) + "\n" for t in parts[2]).encode()
    (tmp_path / "shards" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    assert run(capsys, *sp_args(sp_model, [plain], tmp_path / "ref", "--append-eod"))[0] == 0
    code, err = run(capsys, *sp_args(sp_model, [str(tmp_path / "shards" / "*")], tmp_path / "glob",
                                     "--append-eod", "--workers", 2, "--chunk-bytes", 2048))
    assert code == 0, err
    assert files_of(str(tmp_path / "glob_text_document")) == files_of(str(tmp_path / "ref_text_document"))


def test_several_keys_and_sentence_lists(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in [
        {"text": "1 2 3", "title": "7"},
        {"text": ["4 5", "", "6"], "title": "8 8"},
        {"text": "", "title": "9"},
    ]) + "\n")
    code, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", 100, "--json-keys", "text", "title", "--append-eod")
    assert code == 0, err
    text = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [x.tolist() for x in text[0:len(text)]] == [[1, 2, 3, 99], [4, 5], [6, 99]]
    assert text.document_indices.tolist() == [0, 1, 3]
    title = read_sequences(str(tmp_path / "o_title_document"))
    assert title == [[7, 99], [8, 8, 99], [9, 99]]
    assert "1 empty documents skipped" in err


def test_vocab_at_least_65500_gives_int32(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "70000 1"}) + "\n")
    code, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", 65500, "--append-eod")
    assert code == 2 and "in.jsonl:1: key 'text': NullTokenizer: id 70000 is outside" in err
    code, err = run(capsys, "--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", 80000, "--append-eod")
    assert code == 0, err
    assert read_index(str(tmp_path / "o_text_document.idx"))["dtype_code"] == 4
    assert read_sequences(str(tmp_path / "o_text_document")) == [[70000, 1, 79999]]


BAD_LINES = [
    (b'{"text": "1 2"}\n{"text": "3" oops}\n{"text": "4"}\n', "in.jsonl:2: malformed JSON"),
    (b'{"text": "1 2"}\n{"txt": "3"}\n{"text": "4"}\n', "in.jsonl:2: missing key 'text'"),
    (b'{"text": "1 2"}\n{"text": "4"}\n{"text": "\xff 5"}\n', "in.jsonl:3: not valid UTF-8"),
    (b'{"text": "1 2"}\n[1, 2]\n{"text": "4"}\n', "in.jsonl:2: expected a JSON object"),
    (b'{"text": "1 2"}\n{"text": 5}\n{"text": "4"}\n', "in.jsonl:2: key 'text' holds a JSON int"),
]


@pytest.mark.parametrize("content,message", BAD_LINES)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_stop_or_are_skipped(tmp_path, capsys, content, message, workers):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    prefix = tmp_path / "o_text_document"
    (tmp_path / "o_text_document.bin").write_bytes(b"previous")  # an earlier output must survive
    args = ["--input", src, "--output-prefix", tmp_path / "o", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", 100, "--workers", workers]
    code, err = run(capsys, *args)
    assert code == 2 and message in err and "--skip-bad-lines" in err
    assert (tmp_path / "o_text_document.bin").read_bytes() == b"previous"
    assert not os.path.exists(f"{prefix}.idx")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o_text_document.bin"]  # no temp files left
    code, err = run(capsys, *args, "--skip-bad-lines")
    assert code == 0, err
    assert "bad lines skipped: 1" in err and message in err
    assert len(read_sequences(str(prefix))) == 2


def test_empty_input_and_only_empty_documents(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, err = run(capsys, "--input", empty, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                    "NullTokenizer", "--vocab-size", 10)
    assert code == 2 and "input is empty" in err
    blank_docs = tmp_path / "blank.jsonl"
    blank_docs.write_text('{"text": ""}\n{"text": " "}\n')
    code, err = run(capsys, "--input", blank_docs, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                    "NullTokenizer", "--vocab-size", 10, "--append-eod")
    assert code == 2 and "no document produced any tokens" in err
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "empty.jsonl"]


def test_flag_errors(tmp_path, capsys, sp_model):
    code, err = run(capsys, *sp_args(sp_model, [tmp_path / "none*.jsonl"], tmp_path / "o"))
    assert code == 2 and "no such file" in err
    src = write_jsonl(tmp_path / "in.jsonl", ["a"])
    code, err = run(capsys, *sp_args(str(tmp_path / "missing.model"), [src], tmp_path / "o"))
    assert code == 2 and "--tokenizer-model" in err and "not found" in err


def test_crash_mid_run_leaves_previous_outputs(tmp_path, capsys, monkeypatch, sp_model, texts):
    from megatron_alcot.data import _chunk_encoder

    src = write_jsonl(tmp_path / "in.jsonl", texts)
    assert run(capsys, *sp_args(sp_model, [src], tmp_path / "o"))[0] == 0
    before = files_of(str(tmp_path / "o_text_document"))
    calls = {"n": 0}
    original = _chunk_encoder.ChunkEncoder.__call__

    def failing(self, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk on fire")
        return original(self, chunk)

    monkeypatch.setattr(_chunk_encoder.ChunkEncoder, "__call__", failing)
    with pytest.raises(OSError):
        tool.main([str(a) for a in sp_args(sp_model, [src], tmp_path / "o", "--append-eod", "--chunk-bytes", 2048)])
    assert calls["n"] == 3
    assert files_of(str(tmp_path / "o_text_document")) == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o_text_document.bin", "o_text_document.idx"]


def _default_sigint():
    # A suite started as a background job of a non-interactive shell inherits SIGINT ignored, and
    # Python then never installs its KeyboardInterrupt handler; a terminal's Ctrl-C reaches a
    # foreground tool with the default disposition, which is what this test stands for.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_waiting_for_input_writes_nothing(tmp_path):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, TOOL, "--input", str(fifo), "--output-prefix", str(tmp_path / "o"),
                             "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--workers", "2",
                             "--log-interval", "1", "--chunk-bytes", "64"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    # Never hang the suite if the tool stops responding: kill its workers too, since they hold the
    # stderr pipe open and the readline below would otherwise wait for them forever.
    watchdog = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        with open(fifo, "w") as writer:
            writer.write("".join(json.dumps({"text": f"{i} {i}"}) + "\n" for i in range(50)))
            writer.flush()
            first = proc.stderr.readline()  # the tool has processed input and now waits for more
            assert "processed" in first, first
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    assert code == 130, proc.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
