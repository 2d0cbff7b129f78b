"""`gradwise compress`: variants as run directories, the accuracy budget, one measurement, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gradwise.cli import main
from gradwise.compress.compare import measure_all, write_comparison
from gradwise.compress.pipeline import compress_run, source_budget
from gradwise.compress.recipe import CompressRecipe, load_compress_recipe
from gradwise.compress.runs import load_run_model
from gradwise.config import validate
from gradwise.errors import ConfigError
from gradwise.experiments.evaluation import evaluate_run
from gradwise.train.loop import fit

SOURCE = {
    "seed": 0,
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [64, 32]},
    "optim": {"name": "adam", "lr": 0.003},
    "batch": {"size": 64},
    "stop": {"epochs": 12},
    "log": {"progress": False, "plots": False},
}
QUICK_MEASURE = {"batch_sizes": [1, 32], "repeats": 3, "warmup": 1, "threads": 1}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("source") / "mlp"
    fit(validate(SOURCE), run_dir)
    return run_dir


def recipe(variants: dict, max_drop: float = 0.02) -> CompressRecipe:
    return CompressRecipe.model_validate(
        {"budget": {"max_drop": max_drop}, "measure": QUICK_MEASURE, "variants": variants}
    )


def copy_run(source: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(source, dest, symlinks=True)
    return dest


def test_variants_are_run_directories_that_eval_reads(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe(
        {
            "magnitude-50": [{"prune": {"sparsity": 0.5}}],
            "structured-50": [{"prune": {"structured": 0.5}}],
            "int8": [{"quantize": {"method": "dynamic", "backend": "torchao"}}],
        }
    )
    results = compress_run(run_dir, plan)
    assert [r.name for r in results] == ["magnitude-50", "structured-50", "int8"]
    for result in results:
        assert result.directory == run_dir / "compressed" / result.name
        summary = json.loads((result.directory / "summary.json").read_text())
        # `gradwise eval` on a variant gives what the step recorded (a quantized one included).
        evaluated = evaluate_run(result.directory).metrics
        assert evaluated["test_accuracy"] == pytest.approx(summary["final"]["test_accuracy"], abs=1e-9)
    # The magnitude variant really has half of its prunable weights at zero, same shapes.
    _, _, model, _, _ = load_run_model(run_dir / "compressed" / "magnitude-50", with_data=False)
    weights = [p for p in model.parameters() if p.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == pytest.approx(0.5 * sum(w.numel() for w in weights), abs=2)
    # Its summary says so: zeros over the weight matrices, 3232 of 64·64 + 64·32 + 32·10 = 6464.
    pruned = json.loads((run_dir / "compressed" / "magnitude-50" / "summary.json").read_text())
    assert pruned["sparsity"] == pytest.approx(zeros / 6464, abs=1e-6) == pytest.approx(0.5, abs=2 / 6464)
    # The structured variant is a smaller architecture, recorded in its config.
    cfg = yaml.safe_load((run_dir / "compressed" / "structured-50" / "config.yaml").read_text())
    assert cfg["model"]["hidden"] == [32, 16]


def test_a_variant_over_budget_is_rejected_and_the_chain_stops(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe(
        {"too-sparse": [{"prune": {"sparsity": 0.99}}, {"quantize": {"method": "dynamic", "backend": "torchao"}}]},
        max_drop=0.01,
    )
    [result] = compress_run(run_dir, plan)
    assert result.status == "rejected"
    assert result.reason.startswith("step 1 (prune): val_accuracy")
    assert len(result.steps) == 1  # the quantize step never ran
    record = json.loads((result.directory / "compression.json").read_text())
    assert record["status"] == "rejected" and "quantization" not in record


def test_chain_distill_prune_quantize_and_one_measurement(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe(
        {
            "chain": [
                {
                    "distill": {"model": {"hidden": [32]}, "alpha": 0.7, "temperature": 4.0},
                    "train": {"stop.epochs": 12},
                },
                {"prune": {"sparsity": 0.5, "schedule": "gradual"}, "train": {"stop.epochs": 4, "optim.lr": 0.001}},
                {"quantize": {"method": "dynamic", "backend": "torchao"}},
            ]
        },
        max_drop=0.1,
    )
    [result] = compress_run(run_dir, plan)
    assert result.status == "accepted", result.reason
    assert [s["kind"] for s in result.steps] == ["distill", "prune", "quantize"]
    steps = sorted(p.name for p in (result.directory / "steps").iterdir())
    assert steps == ["01-distill", "02-prune"]
    pruned_cfg = yaml.safe_load((result.directory / "steps" / "02-prune" / "config.yaml").read_text())
    assert pruned_cfg["model"]["hidden"] == [32]  # the student, pruned
    assert pruned_cfg["prune"]["sparsity"] == 0.5

    budget = source_budget(run_dir, plan)
    rows = measure_all(run_dir, [result], plan.measure, budget)
    assert [r["variant"] for r in rows] == ["baseline", "chain"]
    base, chain = rows
    assert base["parameters"] == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert chain["nonzeros"] < chain["parameters"]
    assert chain["size_ratio"] > 3.5  # a quarter of the weights' width, and fewer of them
    assert set(chain["latency_ms"]) == {"1", "32"}
    table = write_comparison(run_dir, rows, budget).read_text()
    assert "| chain | accepted |" in table
    assert chain["sparsity"] == pytest.approx(1 - chain["nonzeros"] / chain["parameters"])
    assert f"| {chain['sparsity']:.4f} |" in table.split("| chain |")[1].splitlines()[0]
    assert (run_dir / "compressed" / "pareto.png").stat().st_size > 10_000


def test_finished_variants_are_reused(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe({"magnitude-30": [{"prune": {"sparsity": 0.3}}]})
    compress_run(run_dir, plan)
    weights = run_dir / "compressed" / "magnitude-30" / "checkpoints" / "best" / "model.safetensors"
    made = weights.stat().st_mtime_ns
    compress_run(run_dir, plan)
    assert weights.stat().st_mtime_ns == made
    compress_run(run_dir, plan, force=True)
    assert weights.stat().st_mtime_ns != made


def test_cli_compress_end_to_end_and_one_line_errors(source_run: Path, tmp_path: Path, capsys):
    run_dir = copy_run(source_run, tmp_path / "run")
    recipe_file = tmp_path / "compress.yaml"
    recipe_file.write_text(
        yaml.safe_dump({"measure": QUICK_MEASURE, "variants": {"int8": [{"quantize": {"method": "dynamic"}}]}})
    )
    assert main(["compress", str(run_dir), str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert "| baseline | source |" in out and "| int8 | accepted |" in out
    assert main(["eval", str(run_dir / "compressed" / "int8")]) == 0
    capsys.readouterr()

    bad = {
        "variants": {"v": [{"prune": {"sparsity": 1.0}}]},
    }
    recipe_file.write_text(yaml.safe_dump(bad))
    assert main(["compress", str(run_dir), str(recipe_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "variants.v.0.prune.sparsity" in err

    recipe_file.write_text(yaml.safe_dump({"variants": {"v": [{"prune": {"sparsity": 0.5, "include": ["conv*"]}}]}}))
    assert main(["compress", str(run_dir), str(recipe_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "conv*" in err

    assert main(["compress", str(tmp_path / "nowhere"), str(recipe_file)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_corrupt_source_checkpoint_is_a_one_line_error(source_run: Path, tmp_path: Path, capsys):
    run_dir = copy_run(source_run, tmp_path / "run")
    best = (run_dir / "checkpoints" / "best").resolve() / "model.safetensors"
    best.write_bytes(b"not safetensors")
    recipe_file = tmp_path / "compress.yaml"
    recipe_file.write_text(yaml.safe_dump({"variants": {"v": [{"prune": {"sparsity": 0.5}}]}}))
    assert main(["compress", str(run_dir), str(recipe_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "corrupt" in err


def test_shipped_compress_recipes_validate():
    from gradwise.experiments.recipes import recipes_dir

    shipped = sorted(recipes_dir().glob("compress-*.yaml"))
    assert len(shipped) >= 3
    for file in shipped:
        assert load_compress_recipe(file).variants


def test_quantize_must_be_last():
    with pytest.raises(ValueError, match="quantize must be the last step"):
        recipe({"v": [{"quantize": {}}, {"prune": {"sparsity": 0.5}}]})


def test_torch_threads_are_left_as_found(source_run: Path, tmp_path: Path):
    before = torch.get_num_threads()
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe({"m": [{"prune": {"sparsity": 0.2}}]})
    rows = measure_all(run_dir, compress_run(run_dir, plan), plan.measure, source_budget(run_dir, plan))
    assert rows[0]["threads"] == 1
    assert torch.get_num_threads() == before


def test_onnx_fp32_export_is_the_same_model(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    [result] = compress_run(run_dir, recipe({"onnx-fp32": [{"quantize": {"method": "none"}}]}))
    source = json.loads((run_dir / "summary.json").read_text())["final"]
    exported = json.loads((result.directory / "summary.json").read_text())["final"]
    assert exported["test_accuracy"] == source["test_accuracy"]
    assert exported["test_loss"] == pytest.approx(source["test_loss"], abs=1e-5)
    assert (result.directory / "model.onnx").stat().st_size > 4 * 6000  # fp32 weights, not int8


def test_export_of_a_quantized_variant_is_the_quantized_file(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    [result] = compress_run(run_dir, recipe({"int8": [{"quantize": {"method": "dynamic"}}]}))
    assert main(["export", str(result.directory), "-o", str(tmp_path / "out")]) == 0
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported == ["compression.json", "config.yaml", "data_info.json", "model.onnx"]
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (result.directory / "model.onnx").read_bytes()


def test_a_step_with_an_intermediate_run_keeps_it_beside_and_reachable(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe({"s50": [{"prune": {"structured": 0.5}, "train": {"stop.epochs": 2}}]}, max_drop=0.2)
    [result] = compress_run(run_dir, plan)
    cfg = yaml.safe_load((result.directory / "config.yaml").read_text())
    assert cfg["model"]["hidden"] == [32, 16]
    # The recovery run started from the pruned intermediate, which is still where its config says.
    assert Path(cfg["model"]["init_from"]) == result.directory / "steps" / "01-prune-structured"
    assert (Path(cfg["model"]["init_from"]) / "checkpoints" / "best").exists()


def test_only_makes_the_named_variants_and_keeps_the_others_made_before(source_run: Path, tmp_path: Path):
    run_dir = copy_run(source_run, tmp_path / "run")
    plan = recipe({"m30": [{"prune": {"sparsity": 0.3}}], "m60": [{"prune": {"sparsity": 0.6}}]})
    assert [r.name for r in compress_run(run_dir, plan, only=["m30"])] == ["m30"]
    assert [r.name for r in compress_run(run_dir, plan, only=["m60"])] == ["m30", "m60"]
    with pytest.raises(ConfigError, match="no variant m90"):
        compress_run(run_dir, plan, only=["m90"])


def test_a_run_trained_with_fsdp_compresses_like_any_other(tmp_path: Path):
    # Saved in the sharded format (strategy fsdp, here in one process): no model.safetensors until needed.
    run_dir = tmp_path / "fsdp"
    fit(validate({**SOURCE, "stop": {"epochs": 3}, "distributed": {"strategy": "fsdp"}}), run_dir)
    best = run_dir / "checkpoints" / "best"
    assert (best / "shards").is_dir() and not (best / "model.safetensors").exists()
    plan = recipe({"recovered": [{"prune": {"sparsity": 0.5}, "train": {"stop.epochs": 1}}]}, max_drop=0.5)
    [result] = compress_run(run_dir, plan)
    # The source's weights were consolidated to be measured on disk; the step trained in one ordinary process.
    assert (best / "model.safetensors").exists()
    assert result.status == "accepted"
    assert yaml.safe_load((result.directory / "config.yaml").read_text())["distributed"]["strategy"] == "ddp"
