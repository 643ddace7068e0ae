"""prepare_data: formats and sources, meta.json truthfulness, idempotence, atomicity, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from nanomoe.cli import main
from nanomoe.data import (
    EOT,
    check_compatible,
    generate_stories,
    load_data_tokenizer,
    open_source,
    prepare_data,
    read_meta,
    run_prepare,
    train_bpe_tokenizer,
)
from nanomoe.data import prepare as prepare_module
from nanomoe.data.sources import read_documents
from nanomoe.data.tokenizer import BPETokenizer
from nanomoe.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork from a threaded process


@pytest.fixture(scope="module")
def docs():
    stories = list(generate_stories(seed=11, count=60))
    # a few documents beyond ASCII, so byte counts differ from character counts
    return stories + ["Zoë ate crème brûlée. 🍮", "熊猫喜欢竹子。", "Ünïcödé story\nwith two lines."]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe_tokenizer(docs, vocab_size=300).save(path)


def write_eot_txt(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n{EOT}\n" for t in texts), encoding="utf-8")
    return path


def split_tokens(data_dir, split):
    """(tokens, document start offsets) of a split, read straight from the files."""
    meta = read_meta(data_dir)
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    starts = np.load(data_dir / f"{split}.docs.npy", allow_pickle=False)
    return tokens, starts


def decoded_documents(data_dir, split):
    tok = load_data_tokenizer(data_dir)
    tokens, starts = split_tokens(data_dir, split)
    ends = list(starts[1:]) + [len(tokens)]
    return [tok.decode(tokens[s : e - 1].tolist()) for s, e in zip(starts, ends)]


def no_data_left(out):
    """Nothing a later run or the trainer would trust, and no temporary files."""
    if not out.exists():
        return True
    names = {p.name for p in out.iterdir()} - {".prepare.lock"}
    return "meta.json" not in names and not any(".tmp-" in n for n in names)


# ---------------------------------------------------------------------------------------------
# meta.json tells the truth


def test_meta_counts_equal_the_file_contents(tmp_path, docs, tokenizer_path):
    src = write_eot_txt(tmp_path / "stories.txt", docs)
    out = prepare_data(src, tmp_path / "data", tokenizer=tokenizer_path, val_fraction=0.1, progress=False)
    meta = read_meta(out)
    tok = load_data_tokenizer(out)
    assert meta["tokenizer_sha256"] == tok.sha256 == BPETokenizer.from_json_str(tokenizer_path.read_text()).sha256
    assert meta["vocab_size"] == tok.vocab_size == 300 and meta["eot_id"] == tok.eot_id and meta["dtype"] == "uint16"
    texts = {"train": [], "val": []}
    for i, text in enumerate(docs):  # every 10th document, from the first, is held out
        texts["val" if i % 10 == 0 else "train"].append(text)
    total_bytes = total_tokens = 0
    for split in ("train", "val"):
        tokens, starts = split_tokens(out, split)
        info = meta["splits"][split]
        assert info["tokens"] == len(tokens)
        assert info["documents"] == len(starts) == int((tokens == tok.eot_id).sum()) == len(texts[split])
        assert starts[0] == 0 and all(tokens[starts[1:] - 1] == tok.eot_id) and tokens[-1] == tok.eot_id
        assert decoded_documents(out, split) == texts[split]
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts[split])
        assert info["bytes_per_token"] == pytest.approx(info["bytes"] / info["tokens"])
        assert info["max_document_tokens"] == max(np.diff(np.append(starts, len(tokens))))
        total_bytes += info["bytes"]
        total_tokens += info["tokens"]
    assert meta["bytes_per_token"] == pytest.approx(total_bytes / total_tokens)
    assert meta["files"] == {name: (out / name).stat().st_size for name in meta["files"]}


def test_large_vocab_uses_uint32(tmp_path):
    tok = train_bpe_tokenizer(["a b c", "b c d"], vocab_size=300)
    tok.vocab_size = 70_000  # pretend: only the dtype choice is under test
    out = prepare_data(write_eot_txt(tmp_path / "s.txt", ["a b c"] * 30), tmp_path / "d", tokenizer=tok, progress=False)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32"
    assert (out / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]


# ---------------------------------------------------------------------------------------------
# Sources and formats


def test_txt_separators(tmp_path):
    eot = tmp_path / "eot.txt"
    eot.write_text(f"First story.\nSecond line.  \n{EOT}\n\n  Second story.\n{EOT}\nThird<|endoftext|>Fourth\n")
    assert list(read_documents(eot)) == ["First story.\nSecond line.", "Second story.", "Third", "Fourth"]
    blank = tmp_path / "blank.txt"
    blank.write_text("One.\nStill one.\n\nTwo.\n \n\n\r\nThree.\r\n")
    assert list(read_documents(blank)) == ["One.\nStill one.", "Two.", "Three."]
    assert list(read_documents(blank, separator="line")) == ["One.", "Still one.", "Two.", "Three."]
    assert list(read_documents(eot, separator="blank"))[0].startswith("First story.")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffStory with a BOM.\n\nNext.".encode("utf-8"))
    assert list(read_documents(bom)) == ["Story with a BOM.", "Next."]


def test_txt_reading_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("nanomoe.data.sources._READ_BLOCK", 64)  # documents straddle many blocks
    texts = [f"Story {i} has ünïcode — and some more words to be long enough." for i in range(40)]
    assert list(read_documents(write_eot_txt(tmp_path / "a.txt", texts))) == texts
    blank = tmp_path / "b.txt"
    blank.write_text("\n\n".join(texts))
    assert list(read_documents(blank)) == texts


def test_every_format_gives_the_same_token_files(tmp_path, docs, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "txt": write_eot_txt(tmp_path / "s.txt", docs),
        "jsonl": tmp_path / "s.jsonl",
        "json": tmp_path / "s.json",
        "parquet": tmp_path / "s.parquet",
    }
    files["jsonl"].write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n\n")
    files["json"].write_text(json.dumps([{"text": t} for t in docs]))
    pq.write_table(pa.table({"text": docs}), files["parquet"], row_group_size=7)
    contents = {}
    for fmt, path in files.items():
        out = prepare_data(path, tmp_path / fmt, tokenizer=tokenizer_path, progress=False)
        contents[fmt] = [(out / f"{s}.bin").read_bytes() for s in ("train", "val")]
    assert all(c == contents["txt"] for c in contents.values())


def test_folder_with_train_and_valid_subfolders_gives_the_splits(tmp_path, docs, tokenizer_path):
    root = tmp_path / "corpus"
    write_eot_txt(root / "train" / "a.txt", docs[:20])
    (root / "train" / "nested").mkdir()
    (root / "train" / "nested" / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs[20:30]))
    (root / "train" / "README.md").write_text("not data: ignored")
    write_eot_txt(root / "val" / "c.txt", docs[30:35])
    out = prepare_data(root, tmp_path / "data", tokenizer=tokenizer_path, progress=False)
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == 30 and meta["splits"]["val"]["documents"] == 5
    assert decoded_documents(out, "train") == docs[:30] and decoded_documents(out, "val") == docs[30:35]
    assert meta["options"]["has_own_val_split"] is True


def test_folders_under_hidden_folders_are_read_but_hidden_files_in_them_are_not(tmp_path, docs, tokenizer_path):
    root = tmp_path / ".cache" / "corpus"  # e.g. under ~/.cache
    write_eot_txt(root / "a.txt", docs[:30])
    write_eot_txt(root / ".partial" / "b.txt", docs[30:])
    write_eot_txt(root / ".c.txt", docs[30:])
    out = prepare_data(root, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert sum(s["documents"] for s in read_meta(out)["splits"].values()) == 30
    with pytest.raises(DataError, match="inside the source folder"):
        prepare_data(root, root / "prepared", tokenizer=tokenizer_path, progress=False)


def test_held_out_validation_split_and_counts(tmp_path, docs, tokenizer_path):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    out = prepare_data(src, tmp_path / "a", tokenizer=tokenizer_path, val_fraction=0.25, seed=1, progress=False)
    val = decoded_documents(out, "val")
    assert val == [t for i, t in enumerate(docs) if i % 4 == 1]
    out = prepare_data(src, tmp_path / "b", tokenizer=tokenizer_path, train_count=7, val_count=3, progress=False)
    meta = read_meta(out)
    assert meta["splits"]["train"]["documents"] == 7 and meta["splits"]["val"]["documents"] == 3
    assert decoded_documents(out, "train") == [t for i, t in enumerate(docs) if i % 20 != 0][:7]


def test_hugging_face_datasets_path_on_a_local_folder_in_hub_layout(tmp_path, docs, tokenizer_path, monkeypatch):
    """The code path of `roneneldan/TinyStories` (datasets.load_dataset), on parquet files laid out like the hub."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()
    hub = tmp_path / "TinyStories"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs[:40]}), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[40:50]}), hub / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[50:]}), hub / "data" / "validation-00000-of-00001.parquet")
    out = prepare_data(f"hf:{hub}", tmp_path / "data", tokenizer=tokenizer_path, progress=False)
    meta = read_meta(out)
    assert meta["source"].startswith("hf:")
    assert decoded_documents(out, "train") == docs[:50] and decoded_documents(out, "val") == docs[50:]
    out = prepare_data(f"hf:{hub}", tmp_path / "sub", tokenizer=tokenizer_path, train_count=5, val_count=2,
                       progress=False)
    assert decoded_documents(out, "train") == docs[:5] and decoded_documents(out, "val") == docs[50:52]


def test_hub_names_go_to_datasets_and_offline_failures_are_explained(monkeypatch):
    import datasets

    asked = []

    def offline(name, **kwargs):
        asked.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for spec in ("tinystories", "roneneldan/TinyStories", "hf:roneneldan/TinyStories"):
        with pytest.raises(DataError, match="offline.*--source builtin"):
            open_source(spec)
    assert asked == ["roneneldan/TinyStories"] * 3


def test_word_tokenizer_prepare_on_several_processes(tmp_path, docs):
    src = write_eot_txt(tmp_path / "s.txt", docs * 3)
    monkeypatch_chunk = prepare_module.CHUNK_CHARS
    try:
        prepare_module.CHUNK_CHARS = 2000  # many chunks, so the pool really splits the work
        out = prepare_data(src, tmp_path / "w", tokenizer_kind="word", vocab_size=500, workers=2, progress=False)
    finally:
        prepare_module.CHUNK_CHARS = monkeypatch_chunk
    meta = read_meta(out)
    assert meta["tokenizer_kind"] == "word"
    expected = [t for i, t in enumerate(docs * 3) if i % 20 != 0]
    assert decoded_documents(out, "train") == expected  # every character was seen in training


# ---------------------------------------------------------------------------------------------
# Idempotence and atomicity


def test_rerun_with_the_same_inputs_does_nothing(tmp_path, docs, tokenizer_path, monkeypatch):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    first = run_prepare(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert not first.skipped
    stamps = {p.name: p.stat().st_mtime_ns for p in first.data_dir.iterdir()}

    def no_work(*args, **kwargs):
        raise AssertionError("encoded again")

    trained = run_prepare(src, tmp_path / "t", vocab_size=280, progress=False)
    assert not trained.skipped
    monkeypatch.setattr(prepare_module, "_encode_source", no_work)
    monkeypatch.setattr(prepare_module, "train_bpe_tokenizer", no_work)
    again = run_prepare(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert again.skipped and again.meta == first.meta
    assert {p.name: p.stat().st_mtime_ns for p in first.data_dir.iterdir()} == stamps
    # without --tokenizer the recipe (kind, vocab size) is the key: a second run skips training too
    assert run_prepare(src, tmp_path / "t", vocab_size=280, progress=False).skipped
    # a changed option or a changed file is new work
    with pytest.raises(AssertionError, match="encoded again"):
        run_prepare(src, tmp_path / "d", tokenizer=tokenizer_path, val_count=2, progress=False)
    time.sleep(0.01)
    src.write_text(src.read_text() + f"One more story.\n{EOT}\n")
    with pytest.raises(AssertionError, match="encoded again"):
        run_prepare(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)


def interrupt_on_second_chunk(monkeypatch):
    real = BPETokenizer.encode_batch
    calls = []

    def encode_then_interrupt(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 3000)
    monkeypatch.setattr(BPETokenizer, "encode_batch", encode_then_interrupt)
    return calls


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, docs, tokenizer_path, monkeypatch):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    calls = interrupt_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert len(calls) >= 2
    assert not (tmp_path / "d").exists()
    with pytest.raises(DataError, match="not found"):
        read_meta(tmp_path / "d")
    monkeypatch.undo()
    out = prepare_data(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert decoded_documents(out, "val") == docs[::20]


def test_interrupted_rerun_keeps_the_previous_data(tmp_path, docs, tokenizer_path, monkeypatch):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    out = prepare_data(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    interrupt_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(src, out, tokenizer=tokenizer_path, train_count=30, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    assert read_meta(out)["splits"]["train"]["documents"] == len(docs) - 4


def test_crash_while_moving_files_in_leaves_nothing_trusted(tmp_path, docs, tokenizer_path, monkeypatch):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    out = prepare_data(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    real_replace = os.replace
    moved = []

    def crash_after_one(a, b):
        if moved:
            raise OSError("disk full")
        moved.append(b)
        real_replace(a, b)

    monkeypatch.setattr(prepare_module.os, "replace", crash_after_one)
    with pytest.raises(OSError, match="disk full"):
        prepare_data(src, out, tokenizer=tokenizer_path, train_count=10, progress=False)
    monkeypatch.undo()
    assert no_data_left(out)  # half old, half new files: meta.json is gone, so nothing is trusted
    with pytest.raises(DataError):
        read_meta(out)


def test_kill_9_during_prepare_leaves_nothing_trusted(tmp_path, docs, tokenizer_path):
    src = write_eot_txt(tmp_path / "s.txt", docs * 5)
    out = tmp_path / "d"
    code = textwrap.dedent(f"""
        import time
        from nanomoe.data import prepare as p
        from nanomoe.data.tokenizer import BPETokenizer
        real = BPETokenizer.encode_batch
        def slow(self, texts):
            print("encoding", flush=True)
            time.sleep(0.3)
            return real(self, texts)
        BPETokenizer.encode_batch = slow
        p.CHUNK_CHARS = 2000
        p.prepare_data(r"{src}", r"{out}", tokenizer=r"{tokenizer_path}", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few chunks in: temporary files exist and are partly written
            assert proc.stdout.readline().startswith("encoding")
        assert any(".tmp-" in p.name for p in out.iterdir())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="no meta.json"):
        read_meta(out)
    result = run_prepare(src, out, tokenizer=tokenizer_path, progress=False)
    assert not result.skipped
    assert not any(".tmp-" in p.name for p in out.iterdir())  # the leftovers were cleaned up
    assert read_meta(out)["splits"]["val"]["documents"] == len(docs * 5) // 20 + 1


# ---------------------------------------------------------------------------------------------
# Bad input: a clear DataError, and nothing left behind


def test_missing_and_empty_inputs(tmp_path, tokenizer_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not found"):
        prepare_data(tmp_path / "missing.txt", out, tokenizer=tokenizer_path, progress=False)
    with pytest.raises(DataError, match="not found"):
        prepare_data(str(tmp_path / "missing.txt"), out, tokenizer=tokenizer_path, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        prepare_data(tmp_path / "empty.txt", out, tokenizer=tokenizer_path, progress=False)
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    with pytest.raises(DataError, match="blank.txt holds no documents"):
        prepare_data(tmp_path / "blank.txt", out, tokenizer=tokenizer_path, progress=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("# not data")
    with pytest.raises(DataError, match="holds no .txt"):
        prepare_data(tmp_path / "folder", out, tokenizer=tokenizer_path, progress=False)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare_data(tmp_path / "data.csv", out, tokenizer=tokenizer_path, progress=False)
    with pytest.raises(DataError, match="tokenizer file .* not found"):
        prepare_data("builtin:0.01", out, tokenizer=tmp_path / "nope.json", progress=False)
    assert not out.exists()


def test_non_utf8_bytes_are_located_or_replaced(tmp_path, tokenizer_path):
    good = f"A fine story.\n{EOT}\nAnother one, ok.\n{EOT}\n".encode()
    path = tmp_path / "latin1.txt"
    path.write_bytes(good + b"Caf\xe9 au lait.\n" + EOT.encode() + b"\n")
    offset = len(good) + len(b"Caf")
    with pytest.raises(DataError, match=rf"latin1.txt: invalid UTF-8 at byte offset {offset}\b.*--errors replace"):
        prepare_data(path, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert not (tmp_path / "d").exists()  # a failed first run leaves no folder
    jsonl = tmp_path / "bad.jsonl"
    first, second = b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n'
    jsonl.write_bytes(first + second)
    offset = len(first) + second.index(b"\xe9")
    with pytest.raises(DataError, match=rf"bad.jsonl: invalid UTF-8 at byte offset {offset}\b"):
        prepare_data(jsonl, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    out = prepare_data(path, tmp_path / "d", tokenizer=tokenizer_path, errors="replace", val_fraction=0.5,
                       progress=False)
    assert "Caf\ufffd au lait." in decoded_documents(out, "val") + decoded_documents(out, "train")


def test_records_without_the_text_field(tmp_path, tokenizer_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"story": "three"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:3: no 'text' field \(fields: story\).*--text-field"):
        prepare_data(path, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    out = tmp_path / "d2"
    path.write_text('{"story": "one"}\n{"story": "two"}\n')
    prepare_data(path, out, tokenizer=tokenizer_path, text_field="story", val_fraction=0.5, progress=False)
    assert read_meta(out)["splits"]["train"]["documents"] == 1
    (tmp_path / "t.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid JSON"):
        prepare_data(tmp_path / "t.jsonl", tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"no 'text' column \(columns: content\)"):
        prepare_data(tmp_path / "p.parquet", tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    assert not (tmp_path / "d").exists()


def test_vocab_too_small_is_refused_before_any_work(tmp_path):
    with pytest.raises(DataError, match="vocab size 100 is too small.*260"):
        prepare_data("builtin:0.01", tmp_path / "d", vocab_size=100, progress=False)
    assert not (tmp_path / "d").exists()


def test_output_dir_from_a_different_tokenizer_is_refused(tmp_path, docs, tokenizer_path):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    out = prepare_data(src, tmp_path / "d", tokenizer=tokenizer_path, progress=False)
    before = (out / "train.bin").read_bytes()
    other = train_bpe_tokenizer(docs, vocab_size=290)
    with pytest.raises(DataError, match="different tokenizer.*--overwrite"):
        prepare_data(src, out, tokenizer=other, progress=False)
    with pytest.raises(DataError, match="different tokenizer"):  # a freshly trained one differs too
        prepare_data(src, out, vocab_size=290, progress=False)
    assert (out / "train.bin").read_bytes() == before and read_meta(out)["vocab_size"] == 300
    prepare_data(src, out, tokenizer=other, overwrite=True, progress=False)
    assert read_meta(out)["vocab_size"] == 290


def test_a_tokenizer_or_model_that_does_not_match_the_data_is_refused(tmp_path, docs, tokenizer_path):
    out = prepare_data(write_eot_txt(tmp_path / "s.txt", docs), tmp_path / "d", tokenizer=tokenizer_path,
                       progress=False)
    assert check_compatible(out, tokenizer=load_data_tokenizer(out), vocab_size=300)["vocab_size"] == 300
    with pytest.raises(DataError, match="different tokenizer"):
        check_compatible(out, tokenizer=train_bpe_tokenizer(docs, vocab_size=290))
    with pytest.raises(DataError, match="vocab_size=300"):
        check_compatible(out, vocab_size=256)


def test_a_damaged_data_dir_is_not_trusted(tmp_path, docs, tokenizer_path):
    out = prepare_data(write_eot_txt(tmp_path / "s.txt", docs), tmp_path / "d", tokenizer=tokenizer_path,
                       progress=False)
    with open(out / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match="val.bin is missing or has a different size"):
        read_meta(out)
    with pytest.raises(DataError, match="not found"):
        read_meta(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_prepare_and_tokenizer_train(tmp_path, docs, capsys):
    src = write_eot_txt(tmp_path / "s.txt", docs)
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "t.json"),
                 "--no-progress"]) == 0
    assert "vocab 300" in capsys.readouterr().out
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "t.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MB/s" in out and "bytes/token" in out
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(tmp_path / "t.json"), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["prepare", "--source", "{tmp}/missing.txt", "--out", "{tmp}/d"], "not found"),
    (["prepare", "--source", "builtin:0.01", "--out", "{tmp}/d", "--vocab-size", "10"], "too small"),
    (["prepare", "--source", "builtin:0.01", "--out", "{tmp}/d", "--vocab-size", "300", "--tokenizer", "{tmp}/t.json"],
     "either --tokenizer"),
    (["tokenizer", "train", "--input", "{tmp}/missing.txt", "--out", "{tmp}/t.json"], "not found"),
])
def test_cli_errors_exit_1_with_a_message_and_no_traceback(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv] + (["--no-progress"] if argv[0] == "prepare" else []))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("nanomoe: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
