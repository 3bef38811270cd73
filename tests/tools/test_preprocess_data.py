"""tools/preprocess_data.py end to end on slices of the shared corpora.

References are independent of the code under test: token ids from Hugging Face ``tokenizers``
(GPT-2 byte-level BPE, BERT WordPiece), sentences from NLTK's punkt directly, and the expected
``.idx`` bytes packed here with ``struct`` from Megatron's documented layout.
"""

import gzip
import json
import os
import re
import struct
import subprocess
import sys

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.training.data_preprocessing import pipeline
from megatron.training.data_preprocessing.sentence_splitter import build_splitter
from tests.tools.conftest import BERT_FLAGS, BERT_VOCAB, GPT2_FLAGS, GPT2_MERGES, GPT2_VOCAB, repo_root
from tools import preprocess_data

EOD = 50256
pytestmark = pytest.mark.skipif(not GPT2_VOCAB.exists(), reason=f"shared assets not found ({GPT2_VOCAB})")


@pytest.fixture(scope="module")
def gpt2_reference():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(GPT2_VOCAB), str(GPT2_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _texts(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8") if line.strip()]


def _run(argv, capsys=None):
    rc = preprocess_data.main([str(a) for a in argv])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def _documents(prefix):
    """The dataset as a list of documents, each a list of sequences (lists of ids)."""
    ds = IndexedDataset(str(prefix))
    bounds = ds.document_indices.tolist()
    return [[ds[i].tolist() for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]


def _reference_idx(documents, code, itemsize):
    lengths = [len(seq) for doc in documents for seq in doc]
    pointers = [0]
    for n in lengths[:-1]:
        pointers.append(pointers[-1] + n * itemsize)
    bounds = [0]
    for doc in documents:
        bounds.append(bounds[-1] + len(doc))
    n, d = len(lengths), len(bounds)
    return (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, n, d) + struct.pack(f"<{n}i", *lengths)
            + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{d}q", *bounds))


def _files(prefix):
    return open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read()


def test_gpt2_documents_match_reference_bytes(tmp_path, brown_slice, gpt2_reference, capsys):
    out = tmp_path / "out" / "gpt"
    out.parent.mkdir()
    rc, cap = _run(["--input", brown_slice, "--output-prefix", out, *GPT2_FLAGS, "--append-eod",
                    "--workers", 1, "--log-interval", 10], capsys)
    assert rc == 0, cap.err
    expected = [[gpt2_reference.encode(t).ids + [EOD]] for t in _texts(brown_slice)]
    assert _documents(f"{out}_text_document") == expected
    bin_bytes, idx_bytes = _files(f"{out}_text_document")
    assert idx_bytes == _reference_idx(expected, 8, 2)  # uint16: GPT-2's 50257 ids < 65500
    assert bin_bytes == numpy.array([t for d in expected for s in d for t in s], dtype="<u2").tobytes()
    assert "Processed 10 documents (" in cap.err and "Processed 20 documents (" in cap.err
    assert sorted(os.listdir(out.parent)) == ["gpt_text_document.bin", "gpt_text_document.idx"]


def test_workers_give_identical_bytes(tmp_path, brown_slice, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "MAX_BATCH_LINES", 3)  # 8 batches, so order across workers matters
    outputs = []
    for workers in (1, 2, 3):
        prefix = tmp_path / f"w{workers}"
        rc, cap = _run(["--input", brown_slice, "--output-prefix", prefix, *GPT2_FLAGS, "--append-eod",
                        "--workers", workers], capsys)
        assert rc == 0, cap.err
        outputs.append(_files(f"{prefix}_text_document"))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(IndexedDataset(str(tmp_path / "w2_text_document"))) == 24


def test_bert_split_sentences_offline(tmp_path, brown_slice, offline_nltk, capsys):
    from nltk.tokenize.punkt import PunktTokenizer
    from tokenizers import BertWordPieceTokenizer

    lines = open(brown_slice, "rb").readlines()[:6]
    src = tmp_path / "six.jsonl"
    src.write_bytes(b"".join(lines))
    rc, cap = _run(["--input", src, "--output-prefix", tmp_path / "bert", *BERT_FLAGS, "--split-sentences",
                    "--workers", 2], capsys)
    assert rc == 0, cap.err
    punkt = PunktTokenizer("english")
    wordpiece = BertWordPieceTokenizer(str(BERT_VOCAB), lowercase=True)
    expected = []
    for text in _texts(src):
        sentences = [wordpiece.encode(s, add_special_tokens=False).ids for s in punkt.tokenize(text)]
        expected.append([s for s in sentences if s])
    got = _documents(tmp_path / "bert_text_sentence")
    assert got == expected
    assert sum(len(d) for d in got) > 100  # really split: Brown files have ~90 sentences each


def test_keep_newlines_keeps_whitespace(tmp_path, brown_slice, offline_nltk, gpt2_reference, capsys):
    src = tmp_path / "four.jsonl"
    src.write_bytes(b"".join(open(brown_slice, "rb").readlines()[:4]))
    rc, cap = _run(["--input", src, "--output-prefix", tmp_path / "nl", *GPT2_FLAGS, "--split-sentences",
                    "--keep-newlines", "--workers", 1], capsys)
    assert rc == 0, cap.err
    docs = _documents(tmp_path / "nl_text_sentence")
    for text, doc in zip(_texts(src), docs, strict=True):
        sentences = [gpt2_reference.decode(seq) for seq in doc]
        assert len(sentences) > 20
        joined, text = "".join(sentences), text.rstrip()
        assert re.sub(r"\s", "", joined) == re.sub(r"\s", "", text)  # no text lost
        # Paragraph breaks stay with their sentence (without --keep-newlines fewer than 15% survive
        # on these files; punkt's quote realignment can still drop the odd one, as in Megatron).
        assert joined.count("\n") >= 0.9 * text.count("\n") > 20


def test_missing_punkt_model_says_how_to_get_it(offline_nltk):
    with pytest.raises(ValueError, match=r"(?s)punkt_tab model for --lang klingon.*nltk\.downloader -d ~/nltk_data punkt_tab"):
        build_splitter(True, "klingon")


def test_partitions_order_and_merge(tmp_path, kjv_slice, capsys):
    common = ["--input", kjv_slice, *GPT2_FLAGS, "--append-eod"]
    rc, cap = _run([*common, "--output-prefix", tmp_path / "one", "--workers", 1], capsys)
    assert rc == 0, cap.err
    base = _documents(tmp_path / "one_text_document")
    rc, cap = _run([*common, "--output-prefix", tmp_path / "rr", "--workers", 2, "--partitions", 2], capsys)
    assert rc == 0, cap.err
    # Megatron's round-robin partitions: lines 0,2,4,... then 1,3,5,...
    assert _documents(tmp_path / "rr_text_document") == base[0::2] + base[1::2]
    rc, cap = _run([*common, "--output-prefix", tmp_path / "seq", "--workers", 2, "--partitions", 2,
                    "--keep-sequential-samples"], capsys)
    assert rc == 0, cap.err
    assert _files(tmp_path / "seq_text_document") == _files(tmp_path / "one_text_document")
    assert not [n for n in os.listdir(tmp_path) if "partitions" in n or ".tmp." in n]
    rc, cap = _run([*common, "--output-prefix", tmp_path / "x", "--workers", 3, "--partitions", 2], capsys)
    assert rc == 1 and "--workers 3 must be a multiple of --partitions 2" in cap.err


def test_gzip_and_glob_inputs(tmp_path, kjv_slice, capsys):
    lines = open(kjv_slice, "rb").readlines()
    (tmp_path / "in").mkdir()
    with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wb") as f:
        f.writelines(lines[:10])
    (tmp_path / "in" / "b.jsonl").write_bytes(b"".join(lines[10:]))
    rc, cap = _run(["--input", tmp_path / "in" / "*", "--output-prefix", tmp_path / "glob", *GPT2_FLAGS,
                    "--workers", 1], capsys)
    assert rc == 0, cap.err
    rc, cap = _run(["--input", kjv_slice, "--output-prefix", tmp_path / "plain", *GPT2_FLAGS, "--workers", 1],
                   capsys)
    assert _files(tmp_path / "glob_text_document") == _files(tmp_path / "plain_text_document")


BAD_LINES = {
    "malformed": (b'{"text": "abc" "def"}\n', "malformed JSON (Expecting ',' delimiter at column 16)"),
    "missing_key": (b'{"body": "abc"}\n', "missing key 'text' (keys present: 'body'"),
    "non_string": (b'{"text": 42}\n', "key 'text' holds a int, expected a string"),
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}\n', "invalid UTF-8 (byte 0xe9 at offset 13)"),
    "not_object": (b'["text"]\n', "expected a JSON object, got a list"),
}
GOOD = [b'{"text": "In the beginning."}\n', b'{"text": "And the earth was without form."}\n',
        b'{"text": ""}\n', b'{"text": ["Already split.", " Two sentences."]}\n']


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tmp_path, kind, capsys):
    bad, reason = BAD_LINES[kind]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(GOOD[0] + b"\n" + bad + GOOD[1])  # line 2 is blank (skipped), line 3 is bad
    (tmp_path / "out").mkdir()
    rc, cap = _run(["--input", src, "--output-prefix", tmp_path / "out" / "p", *GPT2_FLAGS, "--workers", 2], capsys)
    assert rc == 1
    assert f"{src}:3: {reason}" in cap.err, cap.err
    assert "--skip-bad-lines" in cap.err
    assert os.listdir(tmp_path / "out") == []  # no partial or temporary outputs


def test_bad_line_in_a_partition_stops_everything(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(GOOD[0] * 6 + BAD_LINES["missing_key"][0] + GOOD[1] * 6)  # line 7: partition 0 of 2
    (tmp_path / "out").mkdir()
    rc, cap = _run(["--input", src, "--output-prefix", tmp_path / "out" / "p", *GPT2_FLAGS, "--workers", 2,
                    "--partitions", 2], capsys)
    assert rc == 1 and f"{src}:7: missing key 'text'" in cap.err, cap.err
    assert os.listdir(tmp_path / "out") == []  # partition outputs and the temporary folder are gone too


@pytest.mark.parametrize("partitions", [1, 2])
def test_skip_bad_lines_writes_rejects(tmp_path, partitions, monkeypatch, capsys, gpt2_reference):
    monkeypatch.setattr(pipeline, "MAX_BATCH_LINES", 2)
    lines, good, bad_at = [], [], {}
    for i, kind in enumerate(sorted(BAD_LINES)):
        lines += [GOOD[i % len(GOOD)], BAD_LINES[kind][0]]
        good.append(GOOD[i % len(GOOD)])
        bad_at[len(lines)] = BAD_LINES[kind][1]
    src, clean = tmp_path / "mixed.jsonl", tmp_path / "clean.jsonl"
    src.write_bytes(b"".join(lines))
    clean.write_bytes(b"".join(good))
    flags = [*GPT2_FLAGS, "--append-eod", "--workers", 2, "--partitions", partitions]
    rc, cap = _run(["--input", src, "--output-prefix", tmp_path / "mixed", *flags, "--skip-bad-lines"], capsys)
    assert rc == 0, cap.err
    assert "skipped 5 bad lines" in cap.out
    # Good lines sit at even line indices, so with 2 round-robin partitions they all land in
    # partition 0, in input order: either way the result is the clean file encoded in order.
    rc, cap = _run(["--input", clean, "--output-prefix", tmp_path / "clean", *flags[:-1], 1], capsys)
    assert rc == 0, cap.err
    assert _files(tmp_path / "mixed_text_document") == _files(tmp_path / "clean_text_document")
    # An empty text is an empty document; a list of strings is a pre-split document (Megatron's _ss format).
    enc = lambda s: gpt2_reference.encode(s).ids  # noqa: E731
    expected = {GOOD[0]: [enc("In the beginning.") + [EOD]], GOOD[1]: [enc("And the earth was without form.") + [EOD]],
                GOOD[2]: [], GOOD[3]: [enc("Already split."), enc(" Two sentences.") + [EOD]]}
    assert _documents(tmp_path / "clean_text_document") == [expected[line] for line in good]
    records = [json.loads(line) for line in open(tmp_path / "mixed_rejects.jsonl", encoding="utf-8")]
    assert sorted((r["line"], r["error"][:20]) for r in records) == sorted((k, v[:20]) for k, v in bad_at.items())
    assert all(r["file"] == str(src) for r in records)
    assert any(r["raw"] == '{"text": "caf\\xe9 au lait"}' for r in records)
    assert not (tmp_path / "clean_rejects.jsonl").exists()


def test_cli_subprocess(tmp_path, kjv_slice):
    proc = subprocess.run(
        [sys.executable, os.path.join(repo_root(), "tools", "preprocess_data.py"), "--input", str(kjv_slice),
         "--output-prefix", str(tmp_path / "cli"), *GPT2_FLAGS, "--append-eod", "--workers", "2",
         "--log-interval", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Processed 30 documents (" in proc.stderr and "MB/s)." in proc.stderr
    assert "wrote " in proc.stdout and "cli_text_document" in proc.stdout
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 30


def test_several_json_keys(tmp_path, kjv_slice, gpt2_reference, capsys):
    rc, cap = _run(["--input", kjv_slice, "--output-prefix", tmp_path / "k", *GPT2_FLAGS, "--append-eod",
                    "--json-keys", "text", "title", "--workers", 2], capsys)
    assert rc == 0, cap.err
    rows = [json.loads(line) for line in open(kjv_slice, encoding="utf-8")]
    for key in ("text", "title"):
        expected = [[gpt2_reference.encode(row[key]).ids + [EOD]] for row in rows]
        assert _documents(tmp_path / f"k_{key}_document") == expected


def test_tool_path_does_not_import_torch():
    """Importing torch costs 1-2 s of start-up; the tools and the dataset reader must not need it."""
    code = ("import sys; import tools.preprocess_data, tools.merge_datasets, tools.verify_dataset; "
            "import megatron.training.data_preprocessing.partitions; "
            "from megatron.training.tokenizer import build_tokenizer; "
            "tools.preprocess_data.get_parser(); sys.exit('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr or "torch was imported"
