"""``text_files``: the user's texts tokenized once into memory-mapped token files, read lazily in blocks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from gradwise.cli import main
from gradwise.config import validate
from gradwise.data.corpus import EOT, train_tokenizer
from gradwise.data.text_files import load_text_files_dataset, plan_routing, prepare_token_files
from gradwise.data.text_sources import expand_paths, read_pieces
from gradwise.data.token_files import TokenBlocks
from gradwise.errors import ConfigError, DataError
from gradwise.store.checkpoint import load_model_state
from gradwise.train.loop import fit

WORDS = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats and birds sing".split()
TINY_GPT = {
    "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32},
    "task": {"kind": "language_modeling"},
    "optim": {"name": "adamw", "lr": 0.003},
    "schedule": {"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
    "regularize": {"clip_grad_norm": 1.0},
    "batch": {"size": 8},
    "eval": {"every_steps": 5, "batch_size": 64},
    "log": {"progress": False, "plots": False},
}


def prose(seed: int, lines: int = 200) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".\n" for _ in range(lines))


def write_docs(root: Path, n: int = 6, lines: int = 200) -> dict[Path, str]:
    texts = {}
    for i in range(n):
        path = root / "docs" / ("sub" if i % 2 else "") / f"note{i}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[path] = prose(i, lines)
        path.write_text(texts[path], encoding="utf-8")
    return texts


def data_section(**fields) -> object:
    raw = {"name": "text_files", "vocab_size": 300, "seq_len": 16, "val_fraction": 0.2, "test_fraction": 0.2, **fields}
    return validate({"data": raw, **TINY_GPT}).data


# --------------------------------------------------------------------------- (1) the tokens are the tokenizer's


def test_token_files_hold_the_tokenizer_applied_to_each_file(tmp_path: Path):
    texts = write_docs(tmp_path)
    cfg = data_section(paths=str(tmp_path / "docs" / "**" / "*.md"))
    corpus = prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")
    assert corpus.by == "file" and corpus.stored == "uint16" and corpus.vocab_size == 300
    tokenizer = Tokenizer.from_file(str(corpus.directory / "tokenizer.json"))
    assert corpus.eot_id == tokenizer.token_to_id(EOT)
    sources = expand_paths(cfg.paths)
    assert sources == sorted(p.resolve() for p in texts)
    routing = plan_routing(cfg, 0, sources)
    assert set(routing.by_source) == {"train", "val", "test"}
    # By hand: each split's file is <eot> + ids of each of its files, in path order.
    for name in ("train", "val", "test"):
        expected: list[int] = []
        for source, split in zip(sources, routing.by_source, strict=True):
            if split == name:
                expected += [corpus.eot_id, *tokenizer.encode(texts[source]).ids]
        stored = np.fromfile(corpus.directory / f"{name}.bin", dtype=np.uint16)
        assert stored.tolist() == expected
    # The BPE was trained on the training files alone.
    training = [texts[s] for s, split in zip(sources, routing.by_source, strict=True) if split == "train"]
    retrained = train_tokenizer(training, 300)
    assert retrained.to_str() == tokenizer.to_str()
    # The splits' blocks are the stream cut into seq_len + 1 windows, x without the last token, y without the first.
    data = load_text_files_dataset(cfg, seed=0, cache_root=tmp_path / "cache")
    stream = np.fromfile(corpus.directory / "train.bin", dtype=np.uint16).astype(np.int64)
    assert isinstance(data.train.x, TokenBlocks) and len(data.train) == len(stream) // 17
    rows = torch.tensor([0, 3, len(data.train) - 1])
    for i, (x, y) in enumerate(zip(data.train.x[rows], data.train.y[rows], strict=True)):
        block = stream[int(rows[i]) * 17 : int(rows[i]) * 17 + 17]
        assert x.dtype == torch.int64 and x.tolist() == block[:-1].tolist() and y.tolist() == block[1:].tolist()
    assert data.info.kind == "language_modeling" and data.info.tokenizer_dir == str(corpus.directory)
    limited = load_text_files_dataset(data_section(paths=cfg.paths, limit=5), seed=0, cache_root=tmp_path / "cache")
    assert len(limited.train) == 5 and torch.equal(limited.train.x[torch.arange(5)], data.train.x[torch.arange(5)])


def test_a_saved_tokenizer_directory_and_jsonl_documents(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    bpe = train_tokenizer([prose(s) for s in range(3)], 400)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT).save_pretrained(tmp_path / "tok")
    records = [{"text": prose(10 + i, lines=3), "id": i} for i in range(40)]
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = data_section(paths=str(tmp_path / "notes.jsonl"), tokenizer=str(tmp_path / "tok"), vocab_size=None, seq_len=8)
    corpus = prepare_token_files(cfg, seed=1, cache_root=tmp_path / "cache")
    # One file for three splits: its documents (lines) are split, each by a seeded hash of its position.
    assert corpus.by == "document" and sum(corpus.documents.values()) == 40 and min(corpus.documents.values()) > 0
    assert corpus.tokenizer_dir == tmp_path / "tok" and corpus.eot_id == bpe.token_to_id(EOT)
    routing = plan_routing(cfg, 1, expand_paths(cfg.paths))
    for name in ("train", "val", "test"):
        expected: list[int] = []
        for position, record in enumerate(records, start=1):
            if routing.split_of(0, position) == name:
                expected += [corpus.eot_id, *bpe.encode(record["text"]).ids]
        assert np.fromfile(corpus.directory / f"{name}.bin", dtype=np.uint16).tolist() == expected


def test_a_long_text_is_read_in_pieces_that_tokenize_as_the_whole(tmp_path: Path):
    text = prose(7, lines=2000) + "  indented\n\n\ttabbed line\n" + prose(8, lines=500)
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    pieces = list(read_pieces(tmp_path / "long.txt", "text", piece_bytes=4096))
    assert len(pieces) > 10 and "".join(p.text for p in pieces) == text
    assert not pieces[0].continues and all(p.continues for p in pieces[1:])
    tokenizer = train_tokenizer([text], 300)
    joined = [i for p in pieces for i in tokenizer.encode(p.text).ids]
    assert joined == tokenizer.encode(text).ids


# --------------------------------------------------------------------------- (2) the cache


def test_the_cache_is_reused_and_a_changed_file_is_tokenized_anew(tmp_path: Path, monkeypatch):
    texts = write_docs(tmp_path)
    cfg = data_section(paths=str(tmp_path / "docs" / "**" / "*.md"))
    first = prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")

    def no_build(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr("gradwise.data.text_files.build_token_files", no_build)
        again = prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")
        # seq_len only changes the blocks: still no tokenizing.
        load_text_files_dataset(data_section(paths=cfg.paths, seq_len=8), seed=0, cache_root=tmp_path / "cache")
    assert again == first
    changed = next(iter(texts))
    changed.write_text(texts[changed] + "one more line.\n", encoding="utf-8")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")
    assert rebuilt.directory != first.directory
    assert sum(rebuilt.tokens.values()) > sum(first.tokens.values())
    # A damaged cache is rebuilt, never trusted.
    (rebuilt.directory / "val.bin").write_bytes(b"\0")
    assert prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache").tokens == rebuilt.tokens


# --------------------------------------------------------------------------- (3) and (4) training


def write_recipe(project: Path, **data) -> Path:
    write_docs(project, n=8, lines=150)
    raw = {
        "data": {"name": "text_files", "paths": "docs/**/*.md", "vocab_size": 300, "seq_len": 32, **data},
        **TINY_GPT,
        "stop": {"epochs": None, "max_steps": 10},
    }
    recipe = project / "lm.yaml"
    recipe.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return recipe


def test_gradwise_train_on_text_files_end_to_end(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("GRADWISE_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")  # data.paths are read relative to the working directory, as data.path
    assert main(["train", str(recipe), "name=tf"]) == 0
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    (tmp_path / "project" / "runs").rename(elsewhere / "runs")
    monkeypatch.chdir(elsewhere)  # the saved config holds them absolute: the run is read from anywhere
    run = elsewhere / "runs" / "tf"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["val_perplexity"] > 0 and summary["unigram_perplexity"]["split"] == "test"
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert str(tmp_path / "project" / "docs") in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["generate", "runs/tf", "--prompt", "the ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_text_files_resume_is_bit_exact(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("GRADWISE_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "project")
    raw = json.loads(recipe.read_text())
    raw["stop"]["max_steps"] = 12
    raw["batch"] = {"size": 8, "accumulate": 2}
    cfg = validate(raw, source=str(recipe), base_dir=recipe.parent)
    fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_7() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    fit(cfg, tmp_path / "split", stop_requested=stop_at_7)
    fit(cfg, tmp_path / "split", resume=True)
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- (6) tables and saved datasets


def save_like_datasets(directory: Path, texts: list[str]) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: an Arrow IPC *stream*, ``dataset_info.json``, ``state.json``."""
    directory.mkdir(parents=True)
    table = pa.table({"text": texts, "label": list(range(len(texts)))})
    with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    (directory / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state))


def test_saved_datasets_parquet_and_arrow_files_are_read_by_column(tmp_path: Path):
    saved = [prose(i, lines=2) for i in range(30)]
    save_like_datasets(tmp_path / "corpus" / "saved", saved)
    in_parquet = [prose(100 + i, lines=2) for i in range(25)]
    pq.write_table(
        pa.table({"id": range(25), "text": in_parquet}), tmp_path / "corpus" / "more.parquet", row_group_size=4
    )
    in_arrow = [prose(200 + i, lines=2) for i in range(20)]
    with pa.ipc.new_file(str(tmp_path / "corpus" / "extra.arrow"), pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": in_arrow}))
    sources = expand_paths([str(tmp_path / "corpus" / "*")])
    assert [s.name for s in sources] == ["extra.arrow", "more.parquet", "saved"]
    assert [p.text for p in read_pieces(sources[2], "text")] == saved
    assert [p.text for p in read_pieces(sources[1], "text")] == in_parquet
    assert [p.text for p in read_pieces(sources[0], "text")] == in_arrow
    # A glob into the saved dataset's directory does not read its files as texts of their own.
    assert expand_paths([str(tmp_path / "corpus" / "**")]) == sources
    cfg = data_section(paths=str(tmp_path / "corpus" / "*"), val_fraction=0.0, test_fraction=0.0)
    corpus = prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")
    assert corpus.documents == {"train": 75, "val": 0, "test": 0}


# --------------------------------------------------------------------------- (7) one-line errors


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "bad.jsonl line 2: not a JSON object"),
        ("bad.jsonl", '{"text": "fine"}\n\n{"body": "x", "n": 1}\n', "line 3: no field 'text'"),
        ("bad.jsonl", '{"text": 3}\n', "bad.jsonl line 1: field 'text' is int 3, not a string"),
        ("blank.txt", "  \n\n \t\n", "an empty corpus"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image.txt: a binary file, not text (NUL byte at offset 8"),
        ("latin.txt", "caf\xe9\nna\xefve\n".encode("latin-1"), "latin.txt: not UTF-8 text (byte 0xe9 at offset 3"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path: Path, name: str, content, message: str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = data_section(paths=str(path), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError) as caught:
        prepare_token_files(cfg, seed=0, cache_root=tmp_path / "cache")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not list((tmp_path / "cache" / "text_files").iterdir())  # nothing half-written is left


def test_globs_columns_and_settings_that_cannot_work(tmp_path: Path, monkeypatch, capsys):
    with pytest.raises(DataError, match=r"data.paths '.*nothing/\*\.md': matches no file"):
        prepare_token_files(data_section(paths=str(tmp_path / "nothing" / "*.md")), seed=0, cache_root=tmp_path)
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no column 'text' \(data.text_field\); it has: body"):
        prepare_token_files(data_section(paths=str(tmp_path / "t.parquet")), seed=0, cache_root=tmp_path)
    (tmp_path / "small.txt").write_text("a few words only.\n")
    with pytest.raises(DataError, match=r"small\.txt: no text for the training split"):
        load_text_files_dataset(data_section(paths=str(tmp_path / "small.txt")), seed=0, cache_root=tmp_path)
    for i, text in enumerate([prose(0), "tiny.", "tiny too."]):
        (tmp_path / "three" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "three" / f"{i}.txt").write_text(text)
    with pytest.raises(DataError, match=r"the (val|test) split has \d+ tokens, fewer than one block of data.seq_len"):
        load_text_files_dataset(data_section(paths=str(tmp_path / "three" / "*")), seed=0, cache_root=tmp_path)
    with pytest.raises(ConfigError, match=r"data\.vocab_size sizes a BPE trained here"):
        data_section(paths="x", tokenizer=str(tmp_path))
    with pytest.raises(ConfigError, match="not a directory of tokenizer files"):
        prepare_token_files(data_section(paths=str(tmp_path / "small.txt"), tokenizer="nope", vocab_size=None), 0)
    with pytest.raises(ConfigError, match=r"'text_files' takes: .*paths, text_field, tokenizer"):
        validate({"data": {"name": "text_files", "paths": "x", "corpus_chars": 10_000}})
    # Through the CLI: one line on stderr and exit 2, before any run directory is made.
    monkeypatch.setenv("GRADWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"data": {"name": "text_files", "paths": "missing/*.txt"}, **TINY_GPT}))
    assert main(["train", str(recipe), "name=bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing/*.txt': matches no file" in err and "\n" not in err
    assert not (tmp_path / "runs" / "bad").exists()


# --------------------------------------------------------------------------- (5) bounded memory

MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from pathlib import Path
    from gradwise.data.sources import TextFilesData
    from gradwise.data.text_files import load_text_files_dataset
    from gradwise.data.batches import take

    def data_bytes():  # what RLIMIT_DATA counts: private writable mappings
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    def read_all(corpus, cache, held_out):
        paths = [str(corpus / "*.txt")]
        cfg = TextFilesData(paths=paths, vocab_size=300, seq_len=256, val_fraction=held_out, test_fraction=held_out)
        data = load_text_files_dataset(cfg, seed=0, cache_root=cache)
        seen = 0
        for split in (data.train, data.val, data.test):
            order = torch.randperm(len(split))
            for start in range(0, len(split), 64):
                x, y = take(split, order[start : start + 64])
                seen += int(y.numel())
        return seen

    def train(corpus, cache, out, held_out):  # a tiny GPT through the one loop: batches, steps, eval, checkpoints
        import os
        from gradwise.config import validate
        from gradwise.train.loop import fit

        os.environ["GRADWISE_CACHE"] = str(cache)
        raw = {
            "data": {"name": "text_files", "paths": [str(corpus / "*.txt")], "vocab_size": 300, "seq_len": 256,
                     "val_fraction": held_out, "test_fraction": held_out},
            "model": {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32},
            "task": {"kind": "language_modeling"}, "optim": {"name": "adamw", "lr": 0.003},
            "batch": {"size": 8}, "stop": {"epochs": None, "max_steps": 20},
            "eval": {"every_steps": 20, "batch_size": 8}, "log": {"progress": False, "plots": False},
        }
        return fit(validate(raw), out)["final"]["val_loss"]

    small, corpus, cache, headroom = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    # The warm-up holds out 10 % of a small corpus (full eval batches, as below); the big one 2 % (shorter evals).
    read_all(small, cache / "warm-up", 0.1)  # the fixed costs (thread pools, allocator arenas) are the baseline
    train(small, cache / "warm-up-train", cache.parent / "warm-up-run", 0.1)
    baseline = data_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (baseline + headroom, baseline + headroom))
    seen = read_all(corpus, cache / "big", 0.02)
    assert train(corpus, cache / "big-train", cache.parent / "big-run", 0.02) < 6.0  # it learned: ln(300) is 5.7
    token_bytes = sum(f.stat().st_size for f in (cache / "big").rglob("*.bin"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(seen, token_bytes, baseline, data_bytes(), peak)
    """
)


def write_corpus(directory: Path, parts: int, lines: int) -> None:
    directory.mkdir()
    rng = random.Random(0)
    vocabulary = [w + s for w in WORDS for s in ("", "s", "ed", "ing")]
    for i in range(parts):
        text = "".join(" ".join(rng.choices(vocabulary, k=14)) + ".\n" for _ in range(lines))
        (directory / f"part{i:02d}.txt").write_text(text, encoding="utf-8")
    (directory / "one-big.txt").write_text(prose(1, lines=10 * lines), encoding="utf-8")  # a long text in pieces


@pytest.mark.slow
def test_tokenizing_reading_and_training_on_a_corpus_larger_than_the_memory_limit(tmp_path: Path):
    """RLIMIT_DATA (private writable memory) below the token files' size: they are never held in memory,
    neither when every batch is read nor when a GPT trains on them through the loop (steps, eval, checkpoints).

    RLIMIT_AS cannot be used: torch's and the allocators' virtual reservations alone exceed any useful limit.
    """
    write_corpus(tmp_path / "small", parts=3, lines=300)
    write_corpus(tmp_path / "corpus", parts=32, lines=12_000)  # ~42 MB of text, ~35 MB of uint16 ids
    # Measured (2026-12-04): private memory ends 1–16 MiB past the baseline for 33.5 MiB of token files, every
    # batch read and a GPT trained and evaluated on them, with one malloc arena (glibc's per-thread arenas add
    # fragmentation that is not the corpus's); the limit leaves 28 MiB.
    headroom = 28 << 20
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *(str(tmp_path / d) for d in ("small", "corpus", "cache")), str(headroom)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen, token_bytes, baseline, end, peak = map(int, done.stdout.split())
    assert token_bytes > headroom  # the limit is below the baseline plus the token files
    assert seen > 0.95 * token_bytes / 2  # every block of every split was read
    mib = 2**20
    grown = (end - baseline) / mib
    print(f"token files {token_bytes / mib:.1f} MiB; VmData +{grown:.0f} MiB; peak RSS {peak / mib:.0f} MiB")
