"""``meprop reproduce --quick`` produces every table and plot, with the paper's numbers beside ours."""

import csv
import json

from click.testing import CliRunner

from mnist_meprop.cli import main
from mnist_meprop.reproduce import SPEC_FILES, TABLES, build_configs, data_settings, load_spec


def test_table_specs_have_the_paper_settings():
    table1 = load_spec("1")
    rows = {row.label: row for row in table1.rows}
    assert rows["Adam, meProp k=20"].paper == {"test": 98.01, "linear_backward_s": 7.9}
    assert rows["AdaGrad, meProp k=10"].overrides["k"] == 10
    built = build_configs(table1, data_settings("sample", None), [1, 2], None, False, None)
    adam = next(row for row in built if row.label == "Adam, meProp k=20").configs
    assert [c.seed for c in adam] == [1, 2]
    assert (adam[0].d_minibatch, adam[0].unified, adam[0].n_epoch, adam[0].dev_size) == (10, False, 20, 1000)
    table6 = {row.label: row for row in load_spec("6").rows}
    assert table6["meProp k=50, 5 hidden"].overrides == {"n_layer": 6, "k": 50}
    assert len(load_spec("fig4").k_values) >= 8


def test_quick_reproduction_writes_every_table_and_plot(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "REPORT.md").read_text()
    for name in TABLES:
        csv_name = f"{name}.csv" if name in SPEC_FILES else f"table{name}.csv"
        rows = list(csv.reader((tmp_path / csv_name).open()))
        assert len(rows) >= 3, csv_name
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Figure 4", "meSimp",
                  "Early training", "Ablation"):
        assert f"## {title}" in report
    for plot in ("fig4-accuracy-vs-k.png", "fig4-speedup-vs-k.png", "early-training-loss.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in report
    assert "| Adam, meProp k=20 " in report and "98.01" in report and "21.5x" in report
    assert "command: `" in report and "thread(s) per run" in report
    again = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "1", "--out", str(tmp_path)])
    assert again.exit_code == 0
    assert "skipped" in again.stderr and "done:" not in again.stderr


def test_tables_share_identical_runs(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "1,2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "8 distinct runs" in result.stderr  # Table 1: 4 rows, ours and with the authors' details; Table 2 reuses them
    assert "(tables as CSV beside it)" in result.stdout  # no Figure 4 plots to point to
    bad = CliRunner().invoke(main, ["reproduce", "--table", "7"])
    assert bad.exit_code == 2 and "--table" in bad.stderr


def test_idx_needs_a_data_dir():
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--dataset", "idx"])
    assert result.exit_code == 2
    assert "--data-dir" in result.stderr


def test_figure4_can_use_fewer_seeds_and_the_report_keeps_hand_written_notes(tmp_path):
    (tmp_path / "NOTES.md").write_text("Our Fashion numbers are lower because Fashion is harder.\n")
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "3,fig4", "--seeds", "2",
                                       "--fig4-seeds", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "32 distinct runs" in result.stderr  # Table 3: 2 rows x 2 seeds; Figure 4: 28 points x 1 seed
    report = (tmp_path / "REPORT.md").read_text()
    assert "seeds 1-2" in report and "Figure 4: seeds 1-1" in report
    assert "and the Figure 4 plots)" in result.stdout
    assert report.rstrip().endswith("Our Fashion numbers are lower because Fashion is harder.")


def test_mesimp_section_shows_units_accuracy_and_a_reduced_size_baseline(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "mesimp", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {row[0]: row for row in csv.reader((tmp_path / "mesimp.csv").open())}
    simplified, reduced = rows["meSimp k=160"], rows["backprop, hidden = meSimp's average units"]
    header = rows["row"]
    units = simplified[header.index("ours units per layer")]
    assert simplified[header.index("paper avg units")] == "154" and simplified[header.index("paper test %")] == "98.31"
    assert all(int(u) < 500 for u in units.split(" / "))
    assert simplified[header.index("inference speedup (compact vs full)")].endswith("x")
    width = round(sum(int(u) for u in units.split(" / ")) / len(units.split(" / ")))
    assert reduced[header.index("ours units per layer")] == f"{width} / {width}"
    report = (tmp_path / "REPORT.md").read_text()
    assert "## meSimp" in report and "Inference speedup: one forward over the test set" in report


def test_mesimp_inference_is_timed_once_per_run_and_a_regenerated_report_reuses_it(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "mesimp", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    timings_file = tmp_path / "runs" / "inference-timings.jsonl"
    timings = [json.loads(line) for line in timings_file.read_text().splitlines()]
    assert len(timings) == 1 and timings[0]["threads"] >= 1 and timings[0]["full_ms"] > 0
    timings[0]["speedup"] = 99.0  # a stored figure the report must show, not re-measure
    timings_file.write_text(json.dumps(timings[0]) + "\n")
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "mesimp", "--out", str(tmp_path),
                                       "--report-only"])
    assert result.exit_code == 0, result.output
    rows = {row[0]: row for row in csv.reader((tmp_path / "mesimp.csv").open())}
    assert rows["meSimp k=160"][rows["row"].index("inference speedup (compact vs full)")] == "99.00x"
    assert len(timings_file.read_text().splitlines()) == 1


def test_runs_are_ordered_seed_by_seed_so_a_stopped_reproduction_has_whole_seeds():
    from mnist_meprop.reproduce import all_configs
    specs = [load_spec(name) for name in ("1", "3")]
    built = [(spec, build_configs(spec, data_settings("sample", None), [1, 2], None, True, None)) for spec in specs]
    seeds = [config.seed for config in all_configs(built)]
    assert seeds == sorted(seeds) and seeds.count(1) == seeds.count(2) == 9  # Table 1: 4 rows x 2, Table 3: +1


def test_table1_has_the_authors_columns_and_the_ablation_one_row_per_detail(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "1,early,ablation", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table1 = {row[0]: row for row in csv.reader((tmp_path / "table1.csv").open())}
    header = table1["row"]
    adam = table1["Adam, meProp k=20"]
    # the authors' C# program (its log, 7 3/8 epochs) and our run with its details, beside ours
    assert adam[header.index("authors' C# here: test % (epochs run)")] == "95.75 (7 3/8)"
    assert adam[header.index("ours + authors test %")] != adam[header.index("ours test %")]
    assert adam[header.index("authors' C# here: speedup")].endswith("x")
    assert table1["AdaGrad, meProp k=10"][header.index("authors' C# here: test % (epochs run)")] == ""  # k=20 in the log
    ablation = {row[0]: row for row in csv.reader((tmp_path / "ablation.csv").open())}
    assert ablation["Adam, meProp k=20: all the authors' details"][2] == "+0.00"
    assert "AdaGrad, meProp k=10: adagrad_eps: outside" in ablation
    assert "Adam, meProp k=20: adagrad_eps: outside" not in ablation  # means nothing to Adam
    assert len(ablation) == 1 + 7 + 8
    early = {row[0]: row for row in csv.reader((tmp_path / "early.csv").open())}
    assert early["authors' C# program, meProp k=20 (seed 1)"][1:3] == ["2.20", "4.50"]
    assert early["ours with preset authors-csharp, meProp k=20"][1] != ""
    report = (tmp_path / "REPORT.md").read_text()
    assert "![early training loss](early-training-loss.png)" in report and "preset: authors-csharp" in report


def test_report_only_trains_nothing_and_says_what_is_missing(tmp_path):
    first = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "3", "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "3,4", "--seeds", "2", "--report-only",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "done:" not in result.stderr
    report = (tmp_path / "REPORT.md").read_text()
    assert "partial report**: 2 of 8 runs stored" in report
    table4 = list(csv.reader((tmp_path / "table4.csv").open()))
    assert table4[1][3] == "not run"
    table3 = {row[0]: row for row in csv.reader((tmp_path / "table3.csv").open())}
    assert table3["backprop, hidden 20"][1] == "1"  # one of the two seeds is stored


def test_a_variant_without_runs_is_not_run_even_when_its_row_has_runs():
    """The "ours + authors" cell of a row whose own runs are stored says "not run", and "failed" only
    when a run of the variant itself failed."""
    from mnist_meprop.reproduce import table_lines
    from mnist_meprop.store import run_key
    spec = load_spec("1")
    rows = build_configs(spec, data_settings("sample", None), [1], None, False, None)
    times = {"linear_backward": 1.0, "forward": 1.0, "backward": 2.0, "train": 3.5}
    by_key = {run_key(c): {"status": "ok", "test_acc": 95.0, "timings": times, "epochs": [{}]}
              for row in rows for c in row.configs}
    headers, cells = table_lines(spec, rows, by_key)
    variant = headers.index("ours + authors test %")
    assert {line[variant] for line in cells} == {"not run"}
    assert {line[headers.index("ours test %")] for line in cells} == {"95.00"}
    failed = rows[0].variants["authors"][0]
    by_key[run_key(failed)] = {"status": "failed"}
    _, cells = table_lines(spec, rows, by_key)
    assert [line[variant] for line in cells] == ["failed", "not run", "not run", "not run"]


def test_the_parsing_tables_reproduce_on_a_tiny_treebank(tmp_path):
    from mnist_meprop.reproduce import reproduce
    data_dir = _tiny_treebank(tmp_path)
    report = reproduce(["1", "2", "3", "mesimp"], "ewt", str(data_dir), 1, None, True, tmp_path / "parsing",
                       "meprop reproduce", threads=1, log=lambda line: None, task="parsing")
    text = report.read_text()
    assert "Table 1 (parsing)" in text and "Table 3 (parsing)" in text and "meSimp (parsing)" in text
    table2 = list(csv.reader((tmp_path / "parsing" / "table2.csv").open()))
    assert table2[0] == ["row", "seeds", "ours training time per epoch (s)", "ours speedup"]  # no paper column
    assert len(table2) == 7 and all(float(row[2].split(" ")[0]) > 0 for row in table2[1:])
    assert "not run" not in text
    assert "18.6x" in text  # the paper's Adam speedup, from its times (9,078 s against 489 s)
    records = [json.loads(line) for line in (tmp_path / "parsing" / "runs" / "runs.jsonl").read_text().splitlines()]
    # Table 1's six rows (Table 2 times them), Table 3's hidden-20 MLP (its meProp rows are Table 1's Adam k=20 runs), meSimp's
    # run and its backprop MLP as narrow as meSimp's average (its hidden-500 backprop is Table 1's)
    assert len(records) == 9 and {r["config"]["task"] for r in records} == {"parsing"}
    assert sum(r["config"]["output_k"] == 58 for r in records) == 3  # Table 1's two rows at the paper's share, meSimp
    assert sum(bool(r["config"]["simplify"]["enabled"]) for r in records) == 1


def test_the_readme_table_has_the_three_tasks_from_their_own_folders(tmp_path):
    from mnist_meprop.reproduce import readme_table
    data_dir = _tiny_treebank(tmp_path)
    root = tmp_path / "results"
    lines: list[str] = []
    path = readme_table("sample", None, 1, None, True, root, "meprop reproduce --table readme --quick", threads=1,
                        log=lines.append, ewt_dir=str(data_dir))
    assert path == root / "README-TABLE.md"
    rows = [line for line in path.read_text().splitlines() if line.startswith("| ") and "task" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["Parsing (UAS)", "Parsing, output layer k=58 (UAS)",
                                                           "POS tagging (accuracy %)", "MNIST (accuracy %)"]
    parsing = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert parsing[1:3] == ["9,078 s, 89.80", "489 s (18.6x), 88.94 (-0.86)"]  # the paper, recomputed
    rows_by_task = {}
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        rows_by_task[cells[0]] = cells
        assert cells[3].endswith(tuple("0123456789")) and "x), " in cells[4] and cells[5] == "1 / 1", row
    for folder, task in [("parsing-ewt", "parsing"), ("pos-ewt", "pos"), ("mnist-sample", "mnist")]:
        records = [json.loads(line) for line in (root / folder / "runs" / "runs.jsonl").read_text().splitlines()]
        assert len(records) == (3 if task == "parsing" else 2) and {r["config"]["task"] for r in records} == {task}
    # the stored runs are the table: nothing trains again, and the same table comes out
    again = readme_table("sample", None, 1, None, True, root, "meprop reproduce --table readme --quick", threads=1,
                         log=lines.append, ewt_dir=str(data_dir), report_only=True)
    assert again.read_text().split("\n| ")[1:] == path.read_text().split("\n| ")[1:]
    # a task with its backprop run stored and its meProp run not yet: backprop's cell shows, meProp's says so
    pos_runs = root / "pos-ewt" / "runs" / "runs.jsonl"
    pos_runs.write_text("".join(line + "\n" for line in pos_runs.read_text().splitlines() if '"k": 0,' in line))
    partial = readme_table("sample", None, 1, None, True, root, "meprop reproduce --table readme --quick", threads=1,
                           log=lines.append, ewt_dir=str(data_dir), report_only=True)
    pos = [[cell.strip() for cell in line.split("|")[1:-1]] for line in partial.read_text().splitlines()
           if line.startswith("| POS")][0]
    assert pos[3] == rows_by_task["POS tagging (accuracy %)"][3] and pos[4] == "not run" and pos[5] == "1 / 0"


def test_the_mnist_readme_rows_share_table_1s_backprop_run():
    from mnist_meprop.store import run_key
    data = data_settings("mnist", None)
    table1 = {row.label: row for row in build_configs(load_spec("1"), data, [1, 2], None, False, 1)}
    readme = {row.label: row for row in build_configs(load_spec("readme"), data, [1, 2], None, False, 1)}
    assert [run_key(c) for c in readme["backprop"].configs] == [run_key(c) for c in table1["Adam, backprop"].configs]
    assert readme["meProp top-80"].configs[0].k == 80


def test_readme_goes_alone_and_tasks_take_their_datasets(tmp_path):
    mixed = CliRunner().invoke(main, ["reproduce", "--table", "1,readme", "--out", str(tmp_path)])
    assert mixed.exit_code == 2 and "goes alone" in mixed.output
    wrong = CliRunner().invoke(main, ["reproduce", "--task", "parsing", "--dataset", "mnist", "--out", str(tmp_path)])
    assert wrong.exit_code == 2 and "task parsing runs on ewt" in wrong.output
    unknown = CliRunner().invoke(main, ["reproduce", "--task", "parsing", "--table", "5", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "with --task parsing expected 1, 2, 3, 4, readme, mesimp" in unknown.output


def _tiny_treebank(tmp_path):
    """A data_dir with the made-up EWT files of tests/test_pos.py."""
    from test_pos import write_tiny_ewt
    return write_tiny_ewt(tmp_path / "ewt")


def test_the_project_readme_shows_the_stored_readme_table():
    """The README's three-task table is a copy of results/README-TABLE.md (which the command writes)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    stored = [line for line in (root / "results" / "README-TABLE.md").read_text().splitlines() if line.startswith("|")]
    readme = (root / "README.md").read_text().split("<!-- readme-table: from results/README-TABLE.md -->\n", 1)[1]
    shown = readme.split("\n\n", 1)[0].splitlines()
    assert len(stored) == 6 and shown == stored, "run: python scripts/sync_readme_table.py"


def test_the_report_names_the_runs_that_waited_for_a_core(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "3", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs_file = tmp_path / "runs" / "runs.jsonl"
    records = [json.loads(line) for line in runs_file.read_text().splitlines()]
    assert all(0 < epoch["cpu_seconds"] for record in records for epoch in record["epochs"])
    slowed = records[0]
    for record in records:  # one run as if it had half a core, the others a whole one (whatever this machine did)
        for epoch in record["epochs"]:
            epoch["cpu_seconds"] = epoch["seconds"] / (2 if record is slowed else 1)
    del records[1]["epochs"][0]["cpu_seconds"]  # and one stored before CPU time was recorded
    earlier = {k: v for k, v in slowed["epochs"][0].items() if k != "cpu_seconds"}
    slowed["epochs"].insert(0, earlier)  # the slowed run began under code that did not record it
    runs_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    result = CliRunner().invoke(main, ["reproduce", "--quick", "--table", "3", "--threads", "1", "--out", str(tmp_path),
                                       "--report-only"])
    assert result.exit_code == 0, result.output
    section = (tmp_path / "REPORT.md").read_text().split("## Machine load while the runs trained\n", 1)[1]
    assert f"Recorded for {len(records) - 1} of the {len(records)} stored 1-thread runs" in section
    assert f"seed {slowed['seed']} (0.50)" in section.split("Below 0.9: ", 1)[1].split("\n", 1)[0]
    assert section.count("(0.") == 1  # the other runs had their core (or recorded nothing)
    assert f"seed {slowed['seed']} (1 of 2 epochs)" in section.split("Over only the epochs that recorded it", 1)[1]
