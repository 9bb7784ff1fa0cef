"""The engine's GPU check, one prepared run (`bash bench/gpu_check.sh`); installs nothing.

On a machine where torch sees CUDA it runs on `cuda`, elsewhere on the CPU (CI runs it so, to
keep it working). Needs models/demo (carry it to a GPU machine: about 15 MB).

1. greedy: the demo model through the Engine, float32 and int8-at-load, base and a mixed
   batch over its two adapters; the token ids are compared with the CPU's, saved in
   bench/results/gpu_reference.json with each position's top-2 logit margin: equal, or equal
   up to the first position whose reference margin is under MARGIN (rounding on another
   device or CPU may pick either token of a near-tie; what follows then differs).
2. ledger: weights, KV pool and adapters as the engine counts them against what the device
   reports: torch.cuda's allocated and reserved bytes and NVML's count for this process on
   CUDA, RSS on the CPU.
2b. int8 weight-only through a real kernel with bfloat16 compute: which kernel each int8
   matrix takes on the device, and agreement with the CPU's float32 model (>= 0.95).
3. the engine tests (pytest tests/backends/local, the CUDA ones included) where pytest and
   the reference libraries are installed, and bench/engine.py on the demo model where its
   libraries are (each part says why it was skipped otherwise).
4. on CUDA writes bench/results/gpu_check-cuda.json and the section of docs/engine.md between the
   gpu-check markers; in CPU mode the same files go to build/gpu_check/ (the page untouched).

`--update-reference` rewrites the reference from a CPU run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.local.engine import Engine, Event  # noqa: E402
from backends.local.loader import LoadedModel, load_checkpoint  # noqa: E402
from backends.local.lora import install, load_adapter  # noqa: E402
from backends.local.runtime_memory import cuda_process_bytes, resident_bytes  # noqa: E402
from backends.local.sampler import Sampler  # noqa: E402

MODEL = ROOT / "models" / "demo"
REFERENCE = ROOT / "bench" / "results" / "gpu_reference.json"
README = ROOT / "docs" / "engine.md"  # the page with the gpu-check section
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
MARGIN = 1e-3
NEW = 24
QUESTIONS = ["How do I get a refund?", "What are your opening hours?",
             "Can I change my delivery address?", "Tell me about the warranty."]
CASES = {"float32 base": ("none", [0, 0, 0, 0]), "float32 adapters": ("none", [1, 2, 0, 1]),
         "int8 base": ("int8", [0, 0, 0, 0])}


class Recorder:
    """A detokenizer that keeps the token ids (the engine hands every sampled id to it)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def push(self, token: int) -> str:
        self.ids.append(token)
        return ""

    def flush(self) -> str:
        return ""


def load(quantize: str, device: str) -> LoadedModel:
    loaded = load_checkpoint(MODEL, "float32", device, quantize)
    for slot, name in enumerate(("acme-support", "globex-legal"), start=1):
        install(loaded.model, load_adapter(MODEL / "adapters" / name, loaded.model), slot)
    return loaded


def prompts_from_tokenizer() -> list[list[int]]:
    """The questions as chat prompts (token ids stored in the reference: no tokenizer later)."""
    from backends.hf.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_dir(MODEL)
    return [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def greedy(
    loaded: LoadedModel, device: str, prompts: list[list[int]], slots: list[int]
) -> tuple[list[list[int]], Engine]:
    """All prompts at once through the engine, greedy, NEW tokens each (EOS ignored)."""
    engine = Engine(loaded.model, 8 << 20, max_batch_size=8, device=device)
    engine.start()
    done = threading.Semaphore(0)
    recorders = [Recorder() for _ in prompts]
    errors: list[BaseException] = []

    def emit(ev: Event) -> None:
        if ev.error is not None:
            errors.append(ev.error)
        if ev.finish_reason is not None or ev.error is not None:
            done.release()

    for ids, rec, slot in zip(prompts, recorders, slots, strict=True):
        engine.submit(ids, NEW, Sampler(loaded.config.vocab_size, 0.0), rec, emit,  # type: ignore[arg-type]
                      adapter_slot=slot)
    for _ in prompts:
        done.acquire()
    if errors:
        raise errors[0]
    return [r.ids for r in recorders], engine


def margins(
    loaded: LoadedModel, prompts: list[list[int]], slots: list[int], outputs: list[list[int]]
) -> list[list[float]]:
    """The CPU's top-2 logit margin at each generated position (teacher-forced, with LoRA)."""
    from backends.local.model import KVPool, SeqSpan, StepInput
    from backends.local.projection import LoraBatch

    out = []
    for ids, gen, slot in zip(prompts, outputs, slots, strict=True):
        seq = ids + gen[:-1]
        kv = KVPool.allocate(loaded.config, len(seq), torch.float32, "cpu")
        step = StepInput(torch.tensor(seq), torch.arange(len(seq)), torch.arange(len(seq)),
                         [SeqSpan(0, len(seq), torch.arange(len(seq)))],
                         torch.arange(len(ids) - 1, len(seq)),
                         LoraBatch.from_slots([slot] * len(seq), torch.device("cpu")))
        with torch.inference_mode():
            top2 = loaded.model.forward_step(step, kv).topk(2, dim=-1).values
        out.append([round(float(m), 6) for m in top2[:, 0] - top2[:, 1]])
    return out


def compare(got: list[list[int]], ref: dict[str, Any]) -> dict[str, Any]:
    """Tokens equal, or equal up to a near-tie of the reference (margin < MARGIN)."""
    verdicts = []
    for g, want, m in zip(got, ref["tokens"], ref["margins"], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(g, want, strict=True)) if a != b), None)
        if first is None:
            verdicts.append("equal")
        elif m[first] < MARGIN:
            verdicts.append(f"equal up to a near-tie at {first} (CPU margin {m[first]:.2e})")
        else:
            verdicts.append(f"DIFFERENT at {first} (CPU margin {m[first]:.2e})")
    return {"verdicts": verdicts, "ok": all(not v.startswith("DIFFERENT") for v in verdicts)}


def ledger(loaded: LoadedModel, engine: Engine, device: torch.device) -> dict[str, Any]:
    adapters = sum(t.numel() * t.element_size() for m in loaded.model.modules()
                   for w in getattr(m, "adapters", {}).values() for t in (w.a, w.b))
    counted = {"weights": loaded.weight_bytes, "kv_pool": engine.kv_bytes_total,
               "adapters": adapters}
    explained = sum(counted.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        seen = {"torch_allocated": int(torch.cuda.memory_allocated(device)),
                "torch_reserved": int(torch.cuda.memory_reserved(device)),
                "nvml_process": cuda_process_bytes(device)}
        ok = explained <= seen["torch_allocated"] <= seen["torch_reserved"] and (
            seen["nvml_process"] is None or seen["nvml_process"] >= seen["torch_reserved"])
        # what torch holds beyond the ledger: workspace of the last step, allocator rounding
        seen["unexplained_allocated"] = seen["torch_allocated"] - explained
    else:
        seen = {"rss": resident_bytes()}
        ok = seen["rss"] is not None and seen["rss"] >= engine.kv_bytes_total
    return {"counted": counted, "device": seen, "ok": ok}


def int8_kernel(device: str) -> dict[str, Any]:
    """int8 weight-only on `device` with bfloat16 compute: which kernel each int8
    matrix runs through (quantize.Int8Kernel; "dequant" is the fallback, not a kernel) and the
    teacher-forced argmax agreement with the CPU's float32 model on the demo prompts."""
    ref = load_checkpoint(MODEL, "float32", "cpu")
    q8 = load_checkpoint(MODEL, "bfloat16", device, "int8")
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 42, 7, 100, 3, 9, 27, 11]])
    with torch.inference_mode():
        a = ref.model.forward_full(ids)[0]
        b = q8.model.forward_full(ids.to(device))[0].float().cpu()
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    kernels = dict(q8.kernels)
    real = sum(n for k, n in kernels.items() if k != "dequant")
    return {"kernels": kernels, "greedy_agreement": agree,
            "ok": real > 0 and agree >= 0.95 and bool(torch.isfinite(b).all())}


def run_tests(device: str) -> dict[str, Any]:
    missing = [m for m in ("pytest", "transformers", "peft", "tokenizers")
               if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/backends/local"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": tail,
            "ok": proc.returncode == 0}


def run_bench(device: str, out: Path) -> dict[str, Any]:
    missing = [m for m in ("httpx", "tokenizers", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)}"}
    no_hf = [] if importlib.util.find_spec("transformers") and importlib.util.find_spec("peft") \
        else ["--no-hf"]
    cmd = [sys.executable, "-m", "bench.engine", "--model", "models/demo", "--device", device,
           "--cells", "1:0,8:0,8:2,32:0", "--new", "32", "--repeats", "1", "--hf-threads",
           "default", "--out", str(out), *no_hf]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                "error": proc.stderr[-2000:], "ok": False}
    return {"command": "python " + " ".join(cmd[1:]), "ok": True,
            "tables": json.loads(out.read_text())["tables"]}


def section(report: dict[str, Any]) -> str:
    lines = [BEGIN, f"Last run: {report['date']} on **{report['device_name']}** "
             f"(`bash bench/gpu_check.sh`, torch {torch.__version__}).", "",
             "| check | result |", "|---|---|"]
    for case, r in report["greedy"].items():
        lines.append(f"| greedy {case} vs CPU | {'; '.join(r['verdicts'])} |")
    led = report["ledger"]
    lines.append(f"| ledger (weights + KV pool + adapters = {sum(led['counted'].values()):,} B) | "
                 + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                             for k, v in led["device"].items()) + " |")
    k8 = report["int8_kernel"]
    lines.append(f"| int8 weight-only, bfloat16 compute | kernels {k8['kernels']}, agreement "
                 f"with float32 {k8['greedy_agreement']:.3f} |")
    tests = report["tests"]
    lines.append(f"| engine tests | {tests.get('summary', tests.get('skipped'))} |")
    bench = report["bench"]
    if "tables" in bench:
        lines += ["", f"`{bench['command']}`", ""]
        for title, text in bench["tables"].items():
            lines += [f"{title}:", "", text, ""]
    else:
        lines.append(f"| bench/engine.py | {bench.get('skipped', bench.get('error', ''))[:200]} |")
    return "\n".join([*lines, END])


def write_section(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} / {END} markers")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: text, doc, count=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees one), cuda, cpu")
    ap.add_argument("--update-reference", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run `make demo-model` (or carry models/demo to this machine)")
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if args.update_reference:
        if device != "cpu":
            sys.exit("the reference is written from a CPU run")
        prompts, ref = prompts_from_tokenizer(), {}
        for case, (quantize, slots) in CASES.items():
            loaded = load(quantize, "cpu")
            tokens, engine = greedy(loaded, "cpu", prompts, slots)
            engine.stop()
            ref[case] = {"tokens": tokens, "margins": margins(loaded, prompts, slots, tokens)}
        REFERENCE.write_text(json.dumps({"prompts": prompts, "new_tokens": NEW, "cases": ref}) + "\n")
        print(f"wrote {REFERENCE}")
        return
    saved = json.loads(REFERENCE.read_text())
    reference, prompts = saved["cases"], saved["prompts"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "device": device,
        "device_name": torch.cuda.get_device_name(dev) if device == "cuda" else "CPU (no GPU)",
        "greedy": {}}
    for case, (quantize, slots) in CASES.items():
        loaded = load(quantize, device)
        tokens, engine = greedy(loaded, device, prompts, slots)
        report["greedy"][case] = compare(tokens, reference[case])
        if case == "float32 adapters":
            report["ledger"] = ledger(loaded, engine, dev)
        engine.stop()
        print(f"greedy {case}: {report['greedy'][case]['verdicts']}", flush=True)
    print(f"ledger: {report['ledger']}", flush=True)
    report["int8_kernel"] = int8_kernel(device)
    print(f"int8 kernel: {report['int8_kernel']}", flush=True)
    out = ROOT / "bench" / "results" if device == "cuda" else ROOT / "build" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    report["tests"] = {"skipped": "--skip-tests"} if args.skip_tests else run_tests(device)
    print(f"tests: {report['tests']}", flush=True)
    report["bench"] = {"skipped": "--skip-bench"} if args.skip_bench else run_bench(
        device, out / f"engine-demo-{device}.json")
    print(f"bench: {report['bench'].get('tables', report['bench'])}", flush=True)
    (out / f"gpu_check-{device}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = section(report)
    write_section(README if device == "cuda" else out / "README-section.md", text)
    failed = [k for k in ("ledger", "int8_kernel", "tests", "bench")
              if report[k].get("ok") is False]
    failed += [f"greedy {c}" for c, r in report["greedy"].items() if not r["ok"]]
    if failed:
        sys.exit(f"gpu check FAILED: {', '.join(failed)}")
    print(f"gpu check passed on {report['device_name']}")


if __name__ == "__main__":
    main()
