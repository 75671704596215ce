"""POS tagging on CoNLL-U: the strict reader, words and features, and a tagger trained end to end
through the same harness and CLI as MNIST. The sentences are made up here (no corpus is shipped)."""

import gzip
import json

import pytest
import torch
from click.testing import CliRunner

from mnist_meprop.cli import main
from mnist_meprop.config import load_config
from mnist_meprop.conllu import EWT_FILES, EWT_FOLDER, read_conllu
from mnist_meprop.errors import DatasetError
from mnist_meprop.pos_data import NO_TAG, UNKNOWN, TaggedSentences, Vocabulary, word_features, word_key
from mnist_meprop.task import POS, load_pos_data

SENTENCES = [
    [("The", "DT"), ("cat", "NN"), ("sat", "VBD"), ("on", "IN"), ("the", "DT"), ("mat", "NN"), (".", ".")],
    [("Dogs", "NNS"), ("bark", "VBP"), ("loudly", "RB"), (".", ".")],
    [("I", "PRP"), ("saw", "VBD"), ("3", "CD"), ("well-fed", "JJ"), ("cats", "NNS"), ("in", "IN"), ("Paris", "NNP"),
     (".", ".")],
    [("She", "PRP"), ("reads", "VBZ"), ("the", "DT"), ("old", "JJ"), ("book", "NN"), (".", ".")],
]


def conllu(sentences) -> str:
    blocks = []
    for number, sentence in enumerate(sentences, start=1):
        lines = [f"# sent_id = made-up-{number}", "# text = " + " ".join(word for word, _ in sentence)]
        for index, (word, tag) in enumerate(sentence, start=1):
            head = 0 if index == 2 else 2
            lines.append("\t".join([str(index), word, word.lower(), "X", tag, "_", str(head),
                                    "root" if head == 0 else "dep", "_", "_"]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\n"


def write_tiny_ewt(data_dir):
    """``data_dir`` with made-up EWT files: train is the four sentences five times, dev and test once each.
    Returns ``data_dir`` (the config's ``data_dir``)."""
    folder = data_dir / EWT_FOLDER
    folder.mkdir(parents=True)
    for split, (name, _) in EWT_FILES.items():
        (folder / name).write_text(conllu(SENTENCES * (5 if split == "train" else 1)))
    return data_dir


@pytest.fixture
def treebank(tmp_path):
    """A data_dir with made-up train (gzipped, as the release copies here), dev and test files."""
    folder = tmp_path / EWT_FOLDER
    folder.mkdir()
    texts = {"train": conllu(SENTENCES * 5), "dev": conllu(SENTENCES[1:3]), "test": conllu(SENTENCES[::2])}
    for split, (name, _) in EWT_FILES.items():
        if split == "train":
            (folder / f"{name}.gz").write_bytes(gzip.compress(texts[split].encode()))
        else:
            (folder / name).write_text(texts[split])
    return tmp_path


def test_reader_keeps_words_tags_and_heads_and_skips_multiword_tokens(tmp_path):
    text = conllu(SENTENCES[:1]).replace("1\tThe", "1-2\tThe cat\t_\t_\t_\t_\t_\t_\t_\t_\n1\tThe", 1)
    [sentence] = read_conllu(tmp_path / "x.conllu", text)
    assert sentence.words == tuple(word for word, _ in SENTENCES[0])
    assert sentence.xpos == tuple(tag for _, tag in SENTENCES[0])
    assert sentence.heads[:3] == (2, 0, 2)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("cat\tcat\tX", "cat\tX", 1), ":4: expected 10 tab-separated columns, got 9"),
    (lambda t: t.replace("\tNN\t_\t0", "\t_\t_\t0", 1), ":4: the XPOS tag (column 5) is missing"),
    (lambda t: t.replace("2\tcat", "5\tcat", 1), ":4: word ID '5' where 2 was expected"),
    (lambda t: t.replace("\tDT\t_\t2", "\tDT\t_\t99", 1), ":3: HEAD '99' is not a word of its sentence"),
])
def test_malformed_conllu_names_file_and_line(tmp_path, damage, message):
    path = tmp_path / "bad.conllu"
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        read_conllu(path, damage(conllu(SENTENCES[:1])))
    assert str(error.value).startswith(str(path))


def test_words_and_features():
    assert word_key("Paris-2024") == "paris-0000"
    assert word_features("well-fed") == ("lower", "none", "True", "we", "d", "ed", "fed")
    assert word_features("Paris")[0] == "capitalised" and word_features("NASA")[0] == "upper"
    assert word_features("3") [:2] == ("none", "all") and word_features("iPhone")[0] == "mixed"
    assert len(word_features("x")) == 7


def test_vocabulary_maps_rare_and_unseen_words_to_unknown():
    sentences = read_conllu(None, conllu(SENTENCES + SENTENCES[:2]))
    vocabulary = Vocabulary.build(sentences, min_count=2)
    inputs, tags = vocabulary.encode(read_conllu(None, conllu([[("the", "DT"), ("zebra", "NN"), ("Paris", "XX")]]))[0])
    assert inputs.shape == (3, 8)
    assert inputs[0, 0] != UNKNOWN and inputs[1, 0] == UNKNOWN  # "the" is frequent, "zebra" unseen
    assert inputs[2, 0] == UNKNOWN  # "paris" was seen once: rare
    assert tags[2] == NO_TAG and vocabulary.tags[tags[0]] == "DT"
    split = TaggedSentences.encode(sentences[:2], vocabulary)
    [(batch, batch_tags)] = list(split.batches([1, 0], 2))
    assert batch.shape == (2, 7, 8) and (batch_tags[0, 4:] == NO_TAG).all()  # sentence 1 has 4 words, padded


def test_tagger_trains_on_the_harness_and_learns(treebank):
    config = load_config(None, ["task=pos", "dataset=ewt", f"data_dir={treebank}", "d_hidden=32", "k=4",
                                "n_epoch=6", "d_minibatch=2", "lr=0.01", "engine=autograd"])
    data = load_pos_data(config)
    assert data.sizes() == {"train": 20, "dev": 2, "test": 2}
    from mnist_meprop.train import train_run
    result = train_run(config, data, lambda line: None)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    assert result.test_acc > 60  # 16 test tokens, every word seen in training
    scores = POS.build_model(config, data)(data.test.inputs[0].unsqueeze(0))
    assert scores.shape == (len(data.test.tags[0]), len(data.vocabulary.tags))


def test_pos_runs_through_the_cli_resumes_and_bad_files_are_one_line(treebank, tmp_path):
    args = ["train", "--set", "task=pos", "--set", "dataset=ewt", "--set", f"data_dir={treebank}", "--set",
            "d_hidden=16", "--set", "k=3", "--set", "n_epoch=1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "LSTM tagger, hidden 16" in result.output and "meProp per-example top-k" in result.output
    [record] = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert record["config"]["task"] == "pos" and record["data"]["train"] == 20
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "skipped" in again.output
    [model_file] = list((tmp_path / "out" / "models").glob("*.pt"))
    saved = torch.load(model_file, weights_only=True)  # plain data, vocabulary included
    assert saved["config"]["task"] == "pos" and len(saved["vocabulary"]["tags"]) == 13
    export = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "out"), "--out", str(tmp_path / "m.pt")])
    assert export.exit_code == 2 and "another task" in export.output
    test_file = treebank / EWT_FOLDER / EWT_FILES["test"][0]
    test_file.write_text(test_file.read_text().replace("\tDT\t", "\t\t", 1))
    bad = CliRunner().invoke(main, args + ["--fresh"])
    assert bad.exit_code == 2
    error = [line for line in bad.output.splitlines() if line.startswith("meprop: error")]
    assert len(error) == 1 and f"{test_file}:" in error[0] and "XPOS tag" in error[0]


def test_task_and_dataset_must_agree():
    with pytest.raises(Exception, match="dataset: task pos takes ewt"):
        load_config(None, ["task=pos"])
    with pytest.raises(Exception, match="dataset: task mnist takes"):
        load_config(None, ["dataset=ewt"])
    assert load_config(None, ["task=pos", "dataset=ewt"]).engine == "autograd"  # the fused engine is the MLP's


def test_missing_files_and_no_network_is_one_line(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    result = CliRunner().invoke(main, ["train", "--set", "task=pos", "--set", "dataset=ewt", "--set",
                                       f"data_dir={tmp_path}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("meprop: error")]
    assert len(error) == 1 and "could not download" in error[0] and str(tmp_path / EWT_FOLDER) in error[0]


def test_reproduce_writes_the_pos_tables(treebank, tmp_path):
    from mnist_meprop.reproduce import reproduce
    report = reproduce(["1", "2", "3"], "ewt", str(treebank), 1, None, True, tmp_path / "report",
                       "meprop reproduce", threads=1, log=lambda line: None)
    text = report.read_text()
    assert "Table 1 (POS tagging)" in text and "Table 2 (POS tagging)" in text and "Table 3 (POS tagging)" in text
    assert "AdaGrad, meProp k=5" in text and "69.3x" in text  # the paper's speedup, from its times
    assert "30.6x" in text  # the paper's overall backward speedup (16,522 s against 540 s)
    assert "not run" not in text and "UD English-EWT r2.16" in text
    records = [json.loads(line) for line in (tmp_path / "report" / "runs" / "runs.jsonl").read_text().splitlines()]
    # Table 2 times Table 1's Adam runs; Adam k=5 is Table 3's meProp row too
    assert len(records) == 5 and {r["config"]["task"] for r in records} == {"pos"}


def test_reproduce_cli_knows_which_tables_each_dataset_has(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--dataset", "ewt", "--table", "fig4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "with --task pos expected 1, 2, 3, 4, readme" in result.output
