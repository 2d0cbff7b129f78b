"""A crafted run directory makes no file appear outside it: links and paths that lead out are refused in one line.

Each case copies a real run, plants something in the copy (a link out of it, a path in one of its files that is
absolute or climbs out), and runs the commands that read or write a run (``export``, ``eval``, ``resume``,
``consolidate``) through the command line. Beside the run lies a watched directory holding what a link would
reach (a byte copy of the run's weights, of a checkpoint, of its metrics); after every command, nothing outside the
run has changed (names, sizes, mtimes), and every refusal is exit status 2 with one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from gradwise.cli import main
from gradwise.store import lock
from gradwise.store.checkpoint import read_manifest
from gradwise.store.paths import audit_for_writing

QUICK = ["data.limit=300", "stop.epochs=1", "schedule.step_size=5", "log.progress=false", "log.plots=false"]
REFUSED = 2


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain run and a fully sharded one (what ``consolidate`` reads), trained once for every case."""
    out = tmp_path_factory.mktemp("confinement-base")
    runs = {}
    for kind, extra in (("plain", []), ("sharded", ["distributed.strategy=fsdp"])):
        assert main(["train", "digits-mlp", *QUICK, *extra, f"name={kind}", f"out_dir={out}"]) == 0
        runs[kind] = out / kind
    return runs


def snapshot(root: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root`` but ``skip``'s subtree: kind, size, mtime and link target (links not followed)."""
    seen: dict[str, tuple[object, ...]] = {}
    for parent, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if Path(parent, d) != skip]
        for name in [*dirs, *files]:
            path = Path(parent, name)
            if path == skip:
                continue
            st = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, target)
    return seen


# --------------------------------------------------------------------------- the crafted directories


def tagged(run: Path, tag: str = "last") -> Path:
    manifest = read_manifest(run / "checkpoints")
    assert manifest is not None
    return run / "checkpoints" / manifest.tags[tag]


def tagged_by_link(run: Path, tag: str = "last") -> Path:
    return run / "checkpoints" / os.readlink(run / "checkpoints" / tag)


def replace_by_link(path: Path, target: Path | str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def edit_manifest(run: Path, change: Callable[[dict], None]) -> None:
    file = run / "checkpoints" / "manifest.json"
    body = json.loads(file.read_text())
    change(body)
    file.write_text(json.dumps(body))


def write_compression(run: Path, file: str) -> None:
    record = {"source": "elsewhere", "quantization": {"method": "dynamic", "file": file}}
    (run / "compression.json").write_text(json.dumps(record))


def quantized_through_link(run: Path, watched: Path) -> None:
    (run / "q.safetensors").symlink_to(watched / "model.safetensors")
    write_compression(run, "q.safetensors")


def nested_variant(run: Path, target: str | None) -> None:
    """A variant run under RUN/compressed/ as `gradwise compress` writes it (its own checkpoints and tag links)."""
    variant = run / "compressed" / "v"
    variant.mkdir(parents=True)
    shutil.copytree(run / "checkpoints", variant / "checkpoints", symlinks=True)
    shutil.copy(run / "config.yaml", variant / "config.yaml")
    if target is not None:
        replace_by_link(variant / "checkpoints" / "last", target)


def drop_manifest_and_link_last(run: Path, watched: Path) -> None:
    (run / "checkpoints" / "manifest.json").unlink()  # a run made before manifests resolves through its links
    replace_by_link(run / "checkpoints" / "last", watched / "ckpt")


def first_shard(run: Path) -> Path:
    return sorted((tagged(run) / "shards").iterdir())[0]


# Case: (base run, how the copy is crafted, [(command, expected exit status, text the refusal names)]).
# RUN is the crafted run; OUT a path outside it that a refused command must not create.
Craft = Callable[[Path, Path], None]
CASES: dict[str, tuple[str, Craft, list[tuple[list[str], int, str]]]] = {
    "untouched": (
        "plain",
        lambda run, watched: None,
        [(["eval", "RUN"], 0, ""), (["export", "RUN"], 0, "")],  # RUN/export is inside: allowed
    ),
    "export-dir-is-a-link": (
        "plain",
        lambda run, watched: replace_by_link(run / "export", watched),
        [(["export", "RUN"], REFUSED, "symbolic link"), (["export", "RUN", "-o", "RUN/export"], REFUSED, "link")],
    ),
    "export-file-is-a-link": (
        "plain",
        lambda run, watched: ((run / "export").mkdir(), replace_by_link(run / "export/model.safetensors", watched))[-1],
        [(["export", "RUN"], REFUSED, "symbolic link")],
    ),
    "export-into-a-linked-subdirectory": (
        "plain",
        lambda run, watched: replace_by_link(run / "plots", watched / "sub"),
        [(["export", "RUN", "-o", "RUN/plots/x"], REFUSED, "symbolic link")],
    ),
    "quantized-file-absolute": (
        "plain",
        lambda run, watched: write_compression(run, str(watched / "model.safetensors")),
        [(["export", "RUN"], REFUSED, "must be relative"), (["eval", "RUN"], REFUSED, "must be relative")],
    ),
    "quantized-file-climbs-out": (
        "plain",
        lambda run, watched: write_compression(run, "../../x"),
        [(["export", "RUN"], REFUSED, "must be relative"), (["eval", "RUN"], REFUSED, "must be relative")],
    ),
    "quantized-file-climbs-to-a-real-file": (
        "plain",
        lambda run, watched: write_compression(run, "../watched/model.safetensors"),
        [(["export", "RUN", "-o", "OUT"], REFUSED, "must be relative"), (["eval", "RUN"], REFUSED, "relative")],
    ),
    "quantized-file-through-a-link": (
        "plain",
        quantized_through_link,
        [(["export", "RUN", "-o", "OUT"], REFUSED, "leads outside"), (["eval", "RUN"], REFUSED, "leads outside")],
    ),
    "weights-are-a-link-out": (
        "plain",
        lambda run, watched: replace_by_link(tagged(run) / "model.safetensors", watched / "model.safetensors"),
        [
            (["eval", "RUN"], REFUSED, "symbolic link"),
            (["eval", "RUN", "--checkpoint", "last"], REFUSED, "symbolic link"),
            (["export", "RUN"], REFUSED, "symbolic link"),
            (["export", "RUN", "-o", "OUT"], REFUSED, "never read through links"),
            (["resume", "RUN"], REFUSED, "symbolic link"),
        ],
    ),
    "last-links-to-an-absolute-path": (
        "plain",
        lambda run, watched: replace_by_link(run / "checkpoints" / "last", watched / "ckpt"),
        [
            (["resume", "RUN"], REFUSED, "not to a checkpoint of this run"),
            (["export", "RUN"], REFUSED, "not to a checkpoint of this run"),
            (["eval", "RUN", "--checkpoint", "last"], 0, ""),  # readers follow the manifest, never the link
        ],
    ),
    "last-links-up-and-out": (
        "plain",
        lambda run, watched: replace_by_link(run / "checkpoints" / "last", "../.."),
        [
            (["resume", "RUN"], REFUSED, "not to a checkpoint of this run"),
            (["export", "RUN"], REFUSED, "not to a checkpoint of this run"),
            (["eval", "RUN", "--checkpoint", "last"], 0, ""),
        ],
    ),
    "last-links-out-without-a-manifest": (
        "plain",
        drop_manifest_and_link_last,
        [
            (["eval", "RUN", "--checkpoint", "last"], REFUSED, "not to a checkpoint of this run"),
            (["export", "RUN", "--checkpoint", "last", "-o", "OUT"], REFUSED, "not to a checkpoint of this run"),
            (["resume", "RUN"], REFUSED, "not to a checkpoint of this run"),
        ],
    ),
    "weights-link-out-without-a-manifest": (
        "plain",
        lambda run, watched: (
            (run / "checkpoints" / "manifest.json").unlink(),
            replace_by_link(tagged_by_link(run) / "model.safetensors", watched / "model.safetensors"),
        )[-1],
        [
            (["eval", "RUN"], REFUSED, "never read through links"),
            (["export", "RUN", "-o", "OUT"], REFUSED, "never read through links"),
        ],
    ),
    "plots-dir-is-a-link": (
        "plain",
        lambda run, watched: replace_by_link(run / "plots", watched / "sub"),
        [(["resume", "RUN"], REFUSED, "symbolic link")],
    ),
    "metrics-log-is-a-link": (
        "plain",
        lambda run, watched: replace_by_link(run / "metrics.jsonl", watched / "metrics.jsonl"),
        [(["resume", "RUN"], REFUSED, "symbolic link"), (["eval", "RUN"], 0, "")],
    ),
    "summary-is-a-link": (
        "plain",
        lambda run, watched: replace_by_link(run / "summary.json", watched / "keep.txt"),
        [(["resume", "RUN"], REFUSED, "symbolic link")],
    ),
    "manifest-tag-climbs-out": (
        "plain",
        lambda run, watched: edit_manifest(run, lambda m: m["tags"].update(last="../x", best="../x")),
        [
            (["eval", "RUN"], REFUSED, "not a checkpoint of this run"),
            (["resume", "RUN"], REFUSED, "not a checkpoint of this run"),
            (["export", "RUN"], REFUSED, "not a checkpoint of this run"),
        ],
    ),
    "manifest-tag-absolute": (
        "plain",
        lambda run, watched: edit_manifest(run, lambda m: m["tags"].update(best=str(watched / "ckpt"))),
        [(["eval", "RUN"], REFUSED, "not a checkpoint of this run"), (["export", "RUN", "-o", "OUT"], REFUSED, "")],
    ),
    "manifest-file-climbs-out": (
        "plain",
        lambda run, watched: edit_manifest(
            run, lambda m: next(iter(m["files"].values())).update({"../../x": {"bytes": 1, "xxh3_128": "0"}})
        ),
        [
            (["eval", "RUN"], REFUSED, "must be a relative path inside it"),
            (["resume", "RUN"], REFUSED, "must be a relative path inside it"),
        ],
    ),
    "variant-links-are-the-runs-own": (
        "plain",
        lambda run, watched: nested_variant(run, None),
        [(["export", "RUN"], 0, "")],  # a compressed run stays writable
    ),
    "variant-link-leads-out": (
        "plain",
        lambda run, watched: nested_variant(run, str(watched / "ckpt")),
        [(["export", "RUN"], REFUSED, "not to a checkpoint of this run")],
    ),
    "sharded-untouched": (
        "sharded",
        lambda run, watched: None,
        [(["consolidate", "RUN"], 0, "")],  # writes model.safetensors into its own checkpoint
    ),
    "sharded-last-links-out": (
        "sharded",
        lambda run, watched: replace_by_link(run / "checkpoints" / "last", watched / "ckpt"),
        [(["consolidate", "RUN"], REFUSED, "not to a checkpoint of this run")],
    ),
    "sharded-shard-is-a-link-out": (
        "sharded",
        lambda run, watched: replace_by_link(first_shard(run), watched / "shard.safetensors"),
        [
            (["consolidate", "RUN"], REFUSED, "symbolic link"),
            (["consolidate", "RUN", "--checkpoint", "last", "-o", "OUT"], REFUSED, "never read through links"),
        ],
    ),
    "sharded-shards-dir-is-a-link-out": (
        "sharded",
        lambda run, watched: replace_by_link(tagged(run) / "shards", watched / "ckpt" / "shards"),
        [
            (["eval", "RUN"], REFUSED, "leads outside"),
            (["consolidate", "RUN", "--checkpoint", "last", "-o", "OUT"], REFUSED, "leads outside"),
            (["consolidate", "RUN"], REFUSED, "symbolic link"),
        ],
    ),
    "sharded-planted-model-file-link": (
        "sharded",
        lambda run, watched: (tagged(run) / "model.safetensors").symlink_to(watched / "keep.txt"),
        [(["consolidate", "RUN"], REFUSED, "symbolic link")],
    ),
    "sharded-manifest-tag-climbs-out": (
        "sharded",
        lambda run, watched: edit_manifest(run, lambda m: m["tags"].update(last="../../x")),
        [(["consolidate", "RUN"], REFUSED, "not a checkpoint of this run")],
    ),
}


def prepare(base: Path, tmp_path: Path, craft: Craft) -> tuple[Path, Path]:
    """A copy of ``base`` at ``tmp_path/run`` crafted by ``craft``, beside a watched directory of what links reach."""
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    (run / lock.LOCK_FILE).unlink(missing_ok=True)
    watched = tmp_path / "watched"
    (watched / "sub").mkdir(parents=True)
    (watched / "keep.txt").write_text("keep me\n")
    last = tagged(run)
    shutil.copytree(last, watched / "ckpt")
    if (last / "model.safetensors").exists():
        shutil.copy(last / "model.safetensors", watched / "model.safetensors")
    if (last / "shards").is_dir():
        shutil.copy(first_shard(run), watched / "shard.safetensors")
    shutil.copy(run / "metrics.jsonl", watched / "metrics.jsonl")
    craft(run, watched)
    return run, watched


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_run_makes_no_file_appear_outside_it(
    base_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, case: str
):
    kind, craft, commands = CASES[case]
    run, _ = prepare(base_runs[kind], tmp_path, craft)
    monkeypatch.chdir(tmp_path)  # a file written to the working directory would be outside the run too
    before = snapshot(tmp_path, skip=run)
    for command, expected, names in commands:
        argv = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in command]
        argv = [a.replace("RUN/", f"{run}/") for a in argv]
        capsys.readouterr()
        try:
            code = main(argv)
        finally:
            lock.release(run)  # consolidate keeps the lock for the life of its process
        _, err = capsys.readouterr()
        shown = " ".join(command)
        assert code == expected, f"{shown}: exit status {code}\n{err}"
        if expected == REFUSED:
            assert err.startswith(f"gradwise {command[0]}: error: ") and err.count("\n") == 1, f"{shown}: {err!r}"
            assert "Traceback" not in err and names in err, f"{shown}: {err!r}"
        assert snapshot(tmp_path, skip=run) == before, f"{shown} changed something outside {run}"


def test_variant_tag_links_pass_the_audit_but_no_other_link_does(base_runs: dict[str, Path], tmp_path: Path):
    run, watched = prepare(base_runs["plain"], tmp_path, lambda run, watched: nested_variant(run, None))
    audit_for_writing(run)  # the run's own links and a compressed variant's
    (run / "compressed" / "v" / "checkpoints" / "step-00000099").symlink_to(watched / "ckpt")
    with pytest.raises(Exception, match="a symbolic link"):
        audit_for_writing(run)


def test_report_draws_no_plots_through_a_planted_link(
    base_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    run, watched = prepare(
        base_runs["plain"], tmp_path, lambda run, watched: replace_by_link(run / "plots", watched / "sub")
    )
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, skip=run)
    main(["report", str(run), "-o", str(run / "report.html")])
    capsys.readouterr()
    assert snapshot(tmp_path, skip=run) == before, sorted(p.name for p in (watched / "sub").iterdir())
