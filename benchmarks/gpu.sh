#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine; about 8 minutes once the venv exists:
#
#   1. the CUDA-relevant tests: `pytest -m cuda` if that marker exists, else the test files that
#      mention cuda, the compiled-step tests and the bf16 tests                            (<= 130 s)
#   2. GPT-2-size training (124M parameters, 1024 tokens, bf16, model.compile=step): gradwise vs a plain
#      compiled PyTorch loop of the same model, tokens/s, peak memory, MFU vs a measured matmul peak
#      (benchmarks/gpt_mfu.py)                                                                 (<= 120 s)
#   3. the same GPT under FSDP2 (gradwise train --nproc N distributed.strategy=fsdp), only with more
#      than one GPU                                                                            (<= 90 s)
#   4. benchmarks/finetune_vs_hf.py with small settings (it runs on the CPU cores)              (<= 50 s)
#   5. benchmarks/sft_vs_trl.py --device cuda: a 0.5B Llama, full fine-tuning unpacked and packed, and
#      QLoRA where bitsandbytes is installed (LoRA otherwise); gets the time left        (<= 200 s)
#
# Every stage runs under `timeout`, so one that fails or hangs does not stop the others. Results go to
# $OUT when it is set, else benchmarks/gpu-results/: results.json and results.md (all stages), each
# stage's log and JSON.
#
#     bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/gpu-results}"
mkdir -p "$RESULTS"
: > "$RESULTS/stages.tsv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEADLINE=480 # seconds from the first stage; the last stage gets what is left of it

# The venv as README.md's first command makes it (+ the test and bench extras), if there is none.
if [ ! -x .venv/bin/python ]; then
    echo "== setting up .venv (README.md's first command, with the test and bench extras)"
    python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test,bench]'
fi
PY=.venv/bin/python
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
WANTED="trl"
[ "$NGPU" -gt 0 ] && WANTED="trl bitsandbytes" # QLoRA's 4-bit kernels are CUDA-only
PINNED=$($PY -c "import torch, transformers; print(f'torch=={torch.__version__} transformers=={transformers.__version__}')")
for pkg in $WANTED; do # the bench extra may predate them; no network is no error; never moves torch
    if ! $PY -c "import $pkg" 2>/dev/null; then
        # shellcheck disable=SC2086 # $PINNED is two requirements
        timeout 120 .venv/bin/pip install -q --retries 0 --timeout 15 "$pkg" $PINNED >/dev/null 2>&1 \
            || echo "   ($pkg not installed and not installable here: its stage runs without it)"
    fi
done
echo "== $NGPU CUDA device(s): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
START=$SECONDS

stage() { # stage NAME SECONDS COMMAND...: run it time-boxed, log to $RESULTS/NAME.log, record rc and time
    local name=$1 limit=$2
    shift 2
    local begun=$SECONDS
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - begun))
    [ "$rc" -eq 124 ] && echo "   timed out after ${limit} s"
    [ "$rc" -ne 0 ] && tail -n 5 "$RESULTS/$name.log" | sed 's/^/   | /'
    echo "   exit $rc in ${took} s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" "$*" >>"$RESULTS/stages.tsv"
}

# 1. Tests.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
if $PY -m pytest --markers 2>/dev/null | grep -q '^@pytest.mark.cuda'; then
    stage tests-cuda 90 $PY -m pytest -q -p no:cacheprovider $XDIST -m cuda
else
    CUDA_FILES=$(grep -rlE --include='test_*.py' 'cuda' tests | sort | tr '\n' ' ')
    # device=auto picks the GPU: the compiled step (inductor's CUDA kernels) and its bit-exact resume.
    CUDA_FILES="$CUDA_FILES tests/train/test_compile.py"
    BF16_FILES=$(grep -rlE --include='test_*.py' 'def test_[a-z0-9_]*bf16' tests | sort | tr '\n' ' ')
    # shellcheck disable=SC2086 # word splitting of the file lists is intended
    stage tests-cuda 100 $PY -m pytest -q -p no:cacheprovider $XDIST $CUDA_FILES
    # shellcheck disable=SC2086
    stage tests-bf16 30 $PY -m pytest -q -p no:cacheprovider $BF16_FILES -k bf16
fi

# 2. GPT-2-size bf16 training: gradwise vs a plain compiled loop.
stage gpt-mfu 120 $PY benchmarks/gpt_mfu.py --device cuda --size 125m --batch 16 --steps 30 --warmup 8 \
    --out "$RESULTS/gpt_mfu.json"

# 3. The same under FSDP2, with more than one GPU.
if [ "$NGPU" -gt 1 ]; then
    stage gpt-fsdp 90 $PY benchmarks/gpt_mfu.py --device cuda --size 125m --batch $((16 * NGPU)) --steps 40 \
        --warmup 10 --nproc "$NGPU" --out "$RESULTS/gpt_fsdp.json"
fi

# 4. The MiniLM fine-tune vs the HF Trainer, small (CPU by design).
stage finetune-vs-hf 50 $PY benchmarks/finetune_vs_hf.py --limit 256 --epochs 1 --repeats 1 --threads 8

# 5. SFT vs TRL on a 0.5B Llama: what is left of the deadline, at most 200 s.
LEFT=$((DEADLINE - (SECONDS - START)))
[ "$LEFT" -gt 200 ] && LEFT=200
[ "$LEFT" -lt 60 ] && LEFT=60
ATTN=sdpa # flash attention where installed: TRL's padding-free packing needs it to stay within each example cheaply
$PY -c "import flash_attn" 2>/dev/null && ATTN=flash_attention_2
stage sft-vs-trl "$LEFT" $PY benchmarks/sft_vs_trl.py --device cuda --dtype bfloat16 --size 0.5b --repeats 1 \
    --steps 20 --threads 4 --attention "$ATTN" --out "$RESULTS/sft_vs_trl.json"

# One JSON and one markdown table of everything.
$PY - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, took, limit, command = line.split("\t", 4)
    log = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").exists() else ""
    last = next((l for l in reversed(log.splitlines()) if l.strip()), "")
    stages.append({"stage": name, "exit": int(rc), "seconds": int(took), "limit_s": int(limit),
                   "command": command, "last_line": last[:300]})
results = {"stages": stages}
for name in ("gpt_mfu", "gpt_fsdp", "sft_vs_trl"):
    if (out / f"{name}.json").exists():
        results[name] = json.loads((out / f"{name}.json").read_text())
log = out / "finetune-vs-hf.log"
if log.exists():
    results["finetune_vs_hf"] = {"table": [l for l in log.read_text().splitlines() if l.startswith("|")]}
try:
    import torch
    results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    results["torch"] = torch.__version__
except Exception as exc:  # noqa: BLE001
    results["device"] = f"unknown ({exc})"
(out / "results.json").write_text(json.dumps(results, indent=1, default=str))

md = [f"# GPU checks on {results.get('device')} (torch {results.get('torch')})", "",
      "| stage | exit | seconds (limit) | last line |", "|---|---|---|---|"]
for s in stages:
    md.append(f"| {s['stage']} | {s['exit']}{' (timed out)' if s['exit'] == 124 else ''} | "
              f"{s['seconds']} ({s['limit_s']}) | {s['last_line'].replace('|', '/')} |")
for key, title in (("gpt_mfu", "GPT bf16: gradwise vs plain compiled loop"), ("gpt_fsdp", "GPT under FSDP2")):
    if key in results:
        md += ["", f"## {title}", "", results[key]["markdown"]]
if "finetune_vs_hf" in results:
    md += ["", "## MiniLM fine-tune vs HF Trainer (CPU)", "", *results["finetune_vs_hf"]["table"]]
if "sft_vs_trl" in results:
    sft = results["sft_vs_trl"]
    md += ["", "## SFT vs TRL, 0.5B Llama", ""]
    if "markdown" in sft:
        md.append(sft["markdown"])
    else:  # cut short: what finished
        md += ["| config | side | input tokens/s | MFU | peak GPU MB | held-out loss |", "|---|---|---|---|---|---|"]
        for config, sides in sft["runs"].items():
            for side, rs in sides.items():
                for r in rs:
                    md.append(f"| {config} | {side} | {r['input_tokens_per_s']:.0f} | {r['mfu']:.3f} | "
                              f"{r['gpu_peak_mb']:.0f} | {r['heldout_loss']:.4f} |")
(out / "results.md").write_text("\n".join(md) + "\n")
print(f"== results: {out / 'results.json'}, {out / 'results.md'}")
EOF
echo "== done in $((SECONDS - START)) s"
