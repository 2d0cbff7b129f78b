"""`gradwise report`: one self-contained HTML page, checked by parsing it and by loading it in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from gradwise.compress.compare import measure_all
from gradwise.compress.compare import write_comparison as write_compression_comparison
from gradwise.compress.pipeline import compress_run, source_budget
from gradwise.compress.recipe import CompressRecipe
from gradwise.config import validate
from gradwise.errors import ConfigError
from gradwise.experiments.variants import run_variants
from gradwise.report.hooks import plotting_hooks
from gradwise.report.html import json_table, markdown_to_html, write_report
from gradwise.report.plots import _figure, _save
from gradwise.train.loop import fit

RUN = {
    "seed": 0,
    "description": "digits MLP for the report test",
    "data": {"name": "digits", "limit": 400},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "adam", "lr": 0.01},
    "batch": {"size": 32},
    "stop": {"epochs": 3},
    "log": {"progress": False, "plots": True},
}
RUN_PLOTS = ["loss.png", "metrics.png", "lr.png", "confusion.png"]
SWEEP_MD = """Sweep of `digits-mlp` over 2 parameters: 3 trials.

| trial | state | optim.lr | optim.name | val_accuracy | steps |
|---|---|---|---|---|---|
| 0 | COMPLETE | 0.01 | adam | 0.9333 | 36 |
| 1 | PRUNED | 0.0001 | sgd | 0.1167 | 12 |
| 2 | COMPLETE | 0.003 | adam | 0.95 | 36 |
"""
SWEEP_TRIALS = [
    {"number": 0, "state": "COMPLETE", "params": {"optim.lr": 0.01, "optim.name": "adam"}, "value": 0.9333},
    {"number": 1, "state": "PRUNED", "params": {"optim.lr": 0.0001, "optim.name": "sgd"}, "value": 0.1167},
    {"number": 2, "state": "COMPLETE", "params": {"optim.lr": 0.003, "optim.name": "adam"}, "value": 0.95},
]
COMPARE_MD = """Strategies over 2 seeds; "within noise" = Welch's t-test p > 0.05.

| strategy | test_accuracy (mean ± std) | best val_accuracy (mean ± std) | vs best |
|---|---|---|---|
| adam | 0.9500 ± 0.0100 | 0.9600 ± 0.0050 | best |
| sgd | 0.9000 ± 0.0200 | 0.9100 ± 0.0150 | worse (p=0.03) |
"""


class Page(HTMLParser):
    """The parts of a page the tests look at: tags with attributes, ids, tables as cell text, <pre> text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[list[list[str]]] = []
        self.pres: list[str] = []
        self.h2: list[str] = []
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self._h2: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = []
        elif tag == "h2":
            self._h2 = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None
        elif tag == "h2" and self._h2 is not None:
            self.h2.append(" ".join("".join(self._h2).split()))
            self._h2 = None

    def handle_data(self, data: str) -> None:
        for buffer in (self._cell, self._pre, self._h2):
            if buffer is not None:
                buffer.append(data)

    def images(self) -> list[bytes]:
        prefix = "data:image/png;base64,"
        sources = [attrs["src"] or "" for tag, attrs in self.tags if tag == "img"]
        assert all(s.startswith(prefix) for s in sources)
        return [base64.b64decode(s[len(prefix) :], validate=True) for s in sources]

    def row(self, first_cell: str, header: str) -> list[str]:
        """The first row starting with ``first_cell`` in a table whose first column is ``header``."""
        tables = [table for table in self.tables if table and table[0] and table[0][0] == header]
        return next(row for table in tables for row in table[1:] if row and row[0] == first_cell)


def write_png(path: Path, title: str) -> None:
    fig = _figure((6, 3.5))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0.9, 0.93, 0.95], "o-", label="running best")
    ax.set(title=title, xlabel="trial", ylabel="val accuracy (fraction correct)")
    ax.legend()
    _save(fig, path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real run (compressed two ways), a real variants parent, and a sweep and a compare directory."""
    root = tmp_path_factory.mktemp("report")
    run = root / "digits-mlp"
    fit(validate(RUN), run, hooks=plotting_hooks(True))
    plan = CompressRecipe.model_validate(
        {
            "budget": {"max_drop": 0.03},
            "measure": {"batch_sizes": [1, 32], "repeats": 3, "warmup": 1, "threads": 1},
            "variants": {
                "magnitude-30": [{"prune": {"sparsity": 0.3}}],
                "magnitude-95": [{"prune": {"sparsity": 0.95}}],
            },
        }
    )
    budget = source_budget(run, plan)
    write_compression_comparison(run, measure_all(run, compress_run(run, plan), plan.measure, budget), budget)

    # Variants without plots: the report must draw them.
    raw = {**RUN, "log": {"progress": False, "plots": False}, "stop": {"epochs": 1}, "out_dir": str(root)}
    raw["variants"] = {"sgd": {"optim.name": "sgd", "optim.lr": 0.1}, "momentum": {"optim.name": "momentum"}}
    tour = run_variants(raw, validate(raw), "tour.yaml", "tour")

    sweep = root / "sweep-digits-mlp"
    sweep.mkdir()
    (sweep / "trials.json").write_text(json.dumps(SWEEP_TRIALS))
    (sweep / "trials.md").write_text(SWEEP_MD)
    (sweep / "best.yaml").write_text(yaml.safe_dump({**RUN, "optim": {"name": "adam", "lr": 0.003}}))
    write_png(sweep / "trials.png", "sweep: val_accuracy per trial")
    (sweep / "trial-0000").mkdir()
    (sweep / "trial-0000" / "summary.json").write_text(json.dumps({"mode": "max"}))

    compare = root / "compare-digits-mlp"
    compare.mkdir()
    (compare / "compare.json").write_text(json.dumps({"seeds": 2, "strategies": {"adam": {}, "sgd": {}}}))
    (compare / "compare.md").write_text(COMPARE_MD)
    write_png(compare / "compare.png", "compare: val_accuracy over seeds")
    return {"run": run, "tour": tour, "sweep": sweep, "compare": compare}


@pytest.fixture(scope="module")
def report(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert not (dirs["tour"] / "sgd" / "plots").exists()
    paths = [dirs["run"], dirs["tour"], dirs["sweep"], dirs["compare"]]
    return write_report(paths, tmp_path_factory.mktemp("out") / "report.html")


def test_report_shows_every_directory_and_inlines_exactly_their_plots(dirs: dict[str, Path], report: Path):
    text = report.read_text(encoding="ascii")  # non-ASCII is written as character references
    page = Page(text)
    run, tour = dirs["run"], dirs["tour"]
    titles = [h.split(" ")[0] for h in page.h2[1:]]  # the first <h2> is "Contents"
    assert titles == ["digits-mlp", "digits-mlp/compressed", tour.name, "sgd", "momentum", dirs["sweep"].name,
                      dirs["compare"].name]  # fmt: skip
    # Self-contained: no script, style sheet link or remote URL; every link is an anchor on this page.
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    ids = {attrs["id"] for _, attrs in page.tags if attrs.get("id")}
    hrefs = [attrs["href"] for t, attrs in page.tags if t == "a"]
    assert hrefs and all(h.startswith("#") and h[1:] in ids for h in hrefs)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    # Exactly the PNGs of each directory, byte for byte; the variants' plots were drawn for the report.
    expected = [run / "plots" / name for name in RUN_PLOTS] + [run / "compressed" / "pareto.png"]
    expected += [tour / "comparison.png"] + [
        tour / label / "plots" / n for label in ("sgd", "momentum") for n in RUN_PLOTS
    ]
    expected += [dirs["sweep"] / "trials.png", dirs["compare"] / "compare.png"]
    assert page.images() == [path.read_bytes() for path in expected]
    # The run's config, verbatim, and its summary as a table: best and final values per split.
    assert page.pres[0] == (run / "config.yaml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    best, final = summary["best"], summary["final"]
    assert page.row("accuracy", "metric") == [
        "accuracy",
        f"{best['val_accuracy']:.4g}",
        f"{final['val_accuracy']:.4g}",
        f"{final['test_accuracy']:.4g}",
    ]
    assert page.row("loss", "metric")[3] == f"{final['test_loss']:.4g}"
    assert "digits MLP for the report test" in text
    # Comparison tables: the tools' own Markdown rows, cell for cell.
    compression = json.loads((run / "compressed" / "comparison.json").read_text())["rows"]
    statuses = {row["variant"]: row["status"] for row in compression}
    assert statuses == {"baseline": "source", "magnitude-30": "accepted", "magnitude-95": "rejected"}
    assert page.row("magnitude-95", "variant")[:2] == ["magnitude-95", "rejected"]
    tour_rows = json.loads((tour / "comparison.json").read_text())
    assert page.row("sgd", "variant")[1] == f"{tour_rows[0]['best_val_accuracy']:.4g}"
    assert page.row("2", "trial") == ["2", "COMPLETE", "0.003", "adam", "0.95", "36"]
    assert page.row("adam", "strategy") == ["adam", "0.9500 ± 0.0100", "0.9600 ± 0.0050", "best"]
    assert yaml.safe_load(page.pres[-1])["optim"] == {"name": "adam", "lr": 0.003}  # best.yaml, ready to run
    # The contents table: one row per section with a headline a person can scan.
    contents = page.tables[0]
    assert contents[0] == ["section", "kind", "status", "at a glance"]
    assert contents[1][:3] == ["digits-mlp", "run", "completed"]
    assert contents[1][3] == f"best val_accuracy {best['value']:.4g} @ step {best['step']}"
    assert contents[2][3] == "2 variants, 1 accepted, 1 rejected"
    sweep_row = next(row for row in contents if row[0] == dirs["sweep"].name)
    assert sweep_row[3] == "3 trials (2 COMPLETE, 1 PRUNED); best value 0.95 (trial 2)"


def test_report_loads_in_chromium_with_every_image_rendered(report: Path, inspect_page: Callable, tmp_path: Path):
    check = inspect_page(report, tmp_path / "report.png")
    assert check.problems() == []
    assert check.image_count == len(Page(report.read_text()).images()) == 16
    assert check.title.startswith("gradwise report: digits-mlp")
    assert check.screenshot.stat().st_size > 50_000


def test_the_browser_check_fails_on_a_broken_image_a_blank_page_and_a_script_error(
    report: Path, inspect_page: Callable, tmp_path: Path
):
    text = report.read_text()
    broken = tmp_path / "broken.html"
    # Corrupt one inlined PNG: still valid base64, no longer an image.
    broken.write_text(text.replace("data:image/png;base64,iVBORw0KGgo", "data:image/png;base64,AAAAAAAAAAAA", 1))
    problems = inspect_page(broken, tmp_path / "broken.png").problems()
    assert problems[-1] == "broken image: #0 Loss: training (raw and smoothed) and evaluation splits"
    assert all(p.startswith("console error: Failed to load resource") for p in problems[:-1])  # Chromium says so too

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><title></title></head><body></body></html>")
    problems = inspect_page(blank, tmp_path / "blank.png").problems()
    assert problems == ["no visible title", "blank page (0 characters of text)", "screenshot is a single colour"]

    scripted = tmp_path / "scripted.html"
    scripted.write_text(text.replace("</body>", "<script>undefinedFunction()</script></body>"))
    problems = inspect_page(scripted, tmp_path / "scripted.png").problems()
    assert problems == ["page error: undefinedFunction is not defined"]


def test_all_text_from_the_directories_is_escaped(dirs: dict[str, Path], tmp_path: Path):
    run = shutil.copytree(dirs["run"], tmp_path / "run <b>bold & co", symlinks=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["stop_reason"] = "<script>alert(1)</script>"
    (run / "summary.json").write_text(json.dumps(summary))
    parent = tmp_path / "tour"
    parent.mkdir()
    (parent / "comparison.json").write_text(json.dumps([{"variant": "x"}]))
    (parent / "comparison.md").write_text("| variant | note |\n|---|---|\n| x | <img src=x onerror=alert(1)> |\n")
    text = write_report([run, parent], tmp_path / "r.html").read_text()
    page = Page(text)
    assert "script" not in [t for t, _ in page.tags]
    assert "run &lt;b&gt;bold &amp; co" in text and "<b>bold" not in text
    assert [attrs["src"][:5] for t, attrs in page.tags if t == "img"] == ["data:"] * 5  # the run's plots and pareto.png
    assert page.h2[1].startswith("run <b>bold & co")
    assert page.row("x", "variant") == ["x", "<img src=x onerror=alert(1)>"]


def test_missing_plots_are_drawn_and_the_compressed_directory_stands_alone(dirs: dict[str, Path], tmp_path: Path):
    run = shutil.copytree(dirs["run"], tmp_path / "run", symlinks=True)
    shutil.rmtree(run / "plots")
    page = Page(write_report([run, run / "compressed"], tmp_path / "r.html").read_text())
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(RUN_PLOTS)
    pareto = (run / "compressed" / "pareto.png").read_bytes()
    assert page.images() == [(run / "plots" / n).read_bytes() for n in RUN_PLOTS] + [pareto, pareto]
    assert [h.split(" ")[0] for h in page.h2[1:]] == ["run", "run/compressed", "run/compressed"]


def test_a_killed_run_without_summary_is_shown_as_unfinished(dirs: dict[str, Path], tmp_path: Path):
    run = tmp_path / "killed"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(dirs["run"] / name, run / name)
    page = Page(write_report([run], tmp_path / "r.html").read_text())
    assert page.tables[0][1] == ["killed", "run", "unfinished", ""]
    # Drawn from metrics.jsonl alone: no confusion matrix without a summary.
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "lr.png", "metrics.png"]
    assert page.images() == [(run / "plots" / n).read_bytes() for n in ("loss.png", "metrics.png", "lr.png")]


def test_a_path_that_is_no_run_or_comparison_is_a_one_line_config_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, what in [
        (tmp_path / "empty", "not a run or comparison directory"),
        (tmp_path / "file.txt", "not a run or comparison directory"),
        (tmp_path / "missing", "not found"),
    ]:
        with pytest.raises(ConfigError) as info:
            write_report([path], tmp_path / "r.html")
        assert str(info.value).startswith(f"{path}: {what} (expected config.yaml")
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="at least one"):
        write_report([], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_sweep_direction_and_json_tables_without_markdown(tmp_path: Path):
    sweep = tmp_path / "sweep-loss"
    sweep.mkdir()
    trials = [{"number": n, "state": "COMPLETE", "params": {"optim.lr": lr}, "value": v}
              for n, lr, v in [(0, 0.1, 0.52), (1, 0.01, 0.31), (2, 0.001, 0.47)]]  # fmt: skip
    (sweep / "trials.json").write_text(json.dumps({"direction": "minimize", "trials": trials}))
    page = Page(write_report([sweep], tmp_path / "r.html").read_text())
    assert page.tables[0][1][3] == "3 trials (3 COMPLETE); best value 0.31 (trial 1)"
    assert page.tables[1][0] == ["number", "state", "params.optim.lr", "value"]
    assert page.tables[1][2] == ["1", "COMPLETE", "0.01", "0.31"]


def test_markdown_subset_renders_tables_lists_and_inline_code():
    text = "Intro with `code` and **bold** & <tag>.\n\n| a | b \\| c |\n|:---|---:|\n| 1.5 | x |\n\n- one\n- two\n"
    assert markdown_to_html(text) == (
        "<p>Intro with <code>code</code> and <strong>bold</strong> &amp; &lt;tag&gt;.</p>"
        "<div class=scroll><table><thead><tr><th>a</th><th>b | c</th></tr></thead>"
        "<tbody><tr><td class=num>1.5</td><td>x</td></tr></tbody></table></div>"
        "<ul><li>one</li><li>two</li></ul>"
    )


def test_json_table_flattens_nested_records_and_formats_numbers():
    table = json_table([{"v": "a<b", "m": {"x": 0.123456, "n": 12345}}, {"v": None, "m": {"x": 2.0}, "ok": True}])
    rows = Page(table).tables[0]
    assert rows == [["v", "m.x", "m.n", "ok"], ["a<b", "0.1235", "12,345", "–"], ["–", "2", "–", "true"]]


def test_ensure_browser_fails_with_the_installers_message(tmp_path: Path, chromium: Path, ensure_browser: Callable):
    installer = Path(__file__).resolve().parents[2] / "scripts" / "install-test-browser.sh"
    assert os.access(installer, os.X_OK)
    ok = subprocess.run([str(installer)], env={**os.environ, "GRADWISE_TEST_BROWSER": str(chromium)},
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0 and "already installed" in ok.stdout
    # No apt-get on PATH: the installer says why, and the fixture turns that into a failure, not a skip.
    env = {"GRADWISE_TEST_BROWSER": str(tmp_path / "no-browser"), "PATH": str(tmp_path)}
    failed = subprocess.run(["/bin/bash", str(installer)], env=env, capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().startswith("install-test-browser: cannot install chromium: apt-get not found")
    fake = tmp_path / "fake-installer.sh"
    fake.write_text("echo 'cannot install chromium: no mirror' >&2\nexit 1\n")
    with pytest.raises(pytest.fail.Exception, match=r"fake-installer\.sh failed: cannot install chromium: no mirror"):
        ensure_browser(tmp_path / "no-browser", fake)


def test_run_facts_name_trainable_parameters_and_sparsity_where_they_apply():
    from gradwise.report.html import _facts

    dense = _facts({"parameters": 1000, "trainable_parameters": 1000, "sparsity": 0.0})
    assert "1,000" in dense and "trainable" not in dense and "sparsity" not in dense
    probe = _facts({"parameters": 1000, "trainable_parameters": 40, "sparsity": 0.9})
    assert "<span>trainable parameters</span><b>40</b>" in probe
    assert "<span>sparsity (weight matrices)</span><b>0.9000</b>" in probe
