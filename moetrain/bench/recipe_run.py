"""The front door, measured: ``moetrain fit`` on a real recipe, as written, from a random model directory of its shape.

What users run is ``moetrain fit --config recipes/NAME.yaml``. This benchmark runs exactly that, with the
recipe's own paths made real instead of overridden:

1. ``scripts/make_random_hf.py`` writes a random Hugging Face directory of the recipe's ``model.preset``
   (exact shape, key layout, sharded safetensors, ``config.json``, a tokenizer) unless ``--model-dir`` exists;
   the recipe's ``model.init_from`` path is pointed at it (a symbolic link), so ``init_from`` loads it as it
   would load a download.
2. The recipe's ``data.path`` is filled with the shipped tiny corpus repeated 50 times (2.8 M tokens), its
   ``nvme.path`` folder is created as the header says, and ``moetrain plan`` prints its predictions.
3. ``moetrain fit --config RECIPE --trainer.max_steps=N`` with nothing saved (``--checkpoint.every_n_steps=0
   --checkpoint.save_final=false --checkpoint.save_on_signal=false``: the only overrides; a 64 GiB disk
   holds a 16 B download but not its checkpoint, as the recipes' headers say) runs in a child process,
   while this process samples the child's host memory (RSS of the process tree) and the GPU's used memory.

One JSON line (``RESULT {...}``) holds the measured step time, tokens/s, ``mfu``, GPU and host peaks, bytes
paged per step (the offload telemetry), start-up time and the plan's predictions side by side. ``--gpu-gib``
caps the child's GPU memory with ``torch.cuda.set_per_process_memory_fraction`` (an 80 GB card's claim checked
on a larger one). Arguments after the known ones (``--section.key=value``) override the recipe in the plan,
``select-experts`` and the fit alike.

An expert-specialized fine-tuning (ESFT) recipe, whose ``model.train.routed_experts`` names a selection file,
first runs ``moetrain select-experts --config RECIPE --tokens N --top_p P`` on the random directory and the
filled data (after the run directory is cleared, since the file usually lies in it), so the file exists when the
plan and the fit read it; the result records its time and the experts selected. A random directory has no
meaningful routing: the selection is arbitrary there, only its size and what it costs are measured.
``--compare-full`` then runs the same recipe with ``--model.train=all`` (run directory ``<root>-full``, the same
random directory) and prints its RESULT line too, and one more (``recipe_run_compare``) with the ratios:

    python -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b.yaml --steps 3 --out DIR
    python -m moetrain.bench.recipe_run --recipe recipes/deepseek-moe-16b-esft.yaml --compare-full --steps 3

``--random-init`` is for a machine whose disk cannot hold the model directory (Mixtral-8x7B's 87 GiB on a 64 GiB
disk): no directory is written, the fit builds the recipe's preset by random initialisation
(``--model.init_from=null``, one more override, recorded) and the tokenizer is the shipped one. Everything after
the load (the store, the steps, the memory in training, the plan's step) is the recipe's; the load path is not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from moetrain.models.random_hf import DEFAULT_TOKENIZER
from moetrain.offload.config import OffloadSettings
from moetrain.training.telemetry import proc_gib

REPO = Path(__file__).resolve().parents[2]
TINY_CORPUS = REPO / "data" / "tiny" / "train.jsonl"
CORPUS_REPEATS = 50
GiB = 2**30


class PeakSampler:
    """Samples, every ``period`` seconds, the host RSS of a process and its children and the GPU's used memory."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.period = period
        self.host_peak = 0
        self.gpu_peak = 0
        # RSS summed over a process tree counts pages shared after fork (pinned buffers, the model) once per
        # process; the machine's used memory (total - available) over its value before the run does not
        vm = psutil.virtual_memory()
        self.host_used_base = vm.total - vm.available
        self.host_used_peak = 0
        self.timeline: list[dict[str, float]] = []  # every ``every`` s: where the machine's used memory sits
        self.every = 5.0
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _gpu_used(self) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return int(out.split()[0]) * 2**20
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return 0

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                rss = 0
            self.host_peak = max(self.host_peak, rss)
            vm = psutil.virtual_memory()
            self.host_used_peak = max(self.host_used_peak, vm.total - vm.available - self.host_used_base)
            self.gpu_peak = max(self.gpu_peak, self._gpu_used())
            elapsed = time.perf_counter() - self._t0
            if not self.timeline or elapsed - self.timeline[-1]["t"] >= self.every:
                self.timeline.append(self._breakdown(elapsed, vm))
            self._stop.wait(self.period)

    def _breakdown(self, elapsed: float, vm) -> dict[str, float]:
        """GiB of the machine's memory by kind (/proc/meminfo) and of the fit process's own RSS by kind: which
        of anonymous, file-backed, shared or locked memory grows when the host fills."""
        out = {"t": round(elapsed, 1), "used": round((vm.total - vm.available - self.host_used_base) / GiB, 2)}
        out.update({k: round(v, 2) for k, v in proc_gib("/proc/meminfo", {
            "AnonPages": "anon", "Shmem": "shmem", "Cached": "cached", "Dirty": "dirty", "Mlocked": "mlocked",
            "Unevictable": "unevictable", "AnonHugePages": "anon_huge", "Buffers": "buffers"}).items()})
        out.update({k: round(v, 2) for k, v in proc_gib(f"/proc/{self.process.pid}/status", {
            key: f"proc_{key}" for key in ("RssAnon", "RssFile", "RssShmem", "VmPin", "VmLck")}).items()})
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def plan_figures(text: str) -> dict[str, Any]:
    """The predictions in ``moetrain plan``'s output: tier totals (GiB), peaks at load and the step floor (s)."""
    out: dict[str, Any] = {}
    for tier in ("gpu", "host", "nvme", "disk"):
        if m := re.search(rf"^\s*{tier}\s+total\s+([\d.]+) GiB", text, flags=re.M):
            out[f"plan_{tier}_gib"] = float(m.group(1))
    for tier in ("gpu", "host"):
        if m := re.search(rf"^\s*{tier}\s+peak at load\s+([\d.]+) GiB", text, flags=re.M):
            out[f"plan_{tier}_load_gib"] = float(m.group(1))
    if m := re.search(r"floor of a step: ([\d.]+) s", text):
        out["plan_step_s"] = float(m.group(1))
    if m := re.search(r"compute: ([\d.]+) s", text):
        out["plan_compute_s"] = float(m.group(1))
    if m := re.search(r"link: ([\d.]+) GiB per step", text):
        out["plan_paged_gib_per_step"] = float(m.group(1))
    if m := re.search(r"^routed experts training: (\d+) of (\d+)", text, flags=re.M):
        out["plan_trained_experts"], out["plan_total_experts"] = int(m.group(1)), int(m.group(2))
    return out


def prepare(recipe: dict, model_dir: Path, workdir: Path, *, log) -> dict[str, float]:
    """Make the recipe's own paths real under ``workdir`` (the child's working directory)."""
    timings: dict[str, float] = {}
    model = recipe.get("model") or {}
    if not model_dir.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, str(REPO / "scripts" / "make_random_hf.py"), "--preset", model["preset"],
               "--dtype", "bf16", "--out", str(model_dir)]
        print("$ " + " ".join(cmd), file=log, flush=True)
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        timings["make_model_dir_s"] = round(time.perf_counter() - t0, 1)
    for link in {model.get("init_from"), (recipe.get("data") or {}).get("tokenizer")} - {None}:
        target = workdir / link
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink() if target.is_symlink() else shutil.rmtree(target)
        target.symlink_to(model_dir.resolve(), target_is_directory=True)
    data_path = workdir / (recipe.get("data") or {})["path"]
    data_path.parent.mkdir(parents=True, exist_ok=True)
    # the tiny corpus (56 k tokens) repeated, so that the recipe's 1% validation split still holds whole rows
    corpus = TINY_CORPUS.read_text()
    data_path.write_text(corpus * CORPUS_REPEATS)
    val_path = (recipe.get("data") or {}).get("val_path")
    if val_path:  # a separate validation file: the corpus once
        (workdir / val_path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / val_path).write_text(corpus)
    nvme = OffloadSettings.from_dict(model.get("offload")).nvme.path
    if nvme:
        (workdir / nvme).mkdir(parents=True, exist_ok=True)
    for name in ("recipes", "configs", "data/tiny", "data/examples"):
        target = workdir / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(REPO / name, target_is_directory=True)
    return timings


def child_command(recipe_path: str, *, steps: int, gpu_gib: Optional[float], overrides: tuple[str, ...] = ()
                  ) -> list[str]:
    # nothing saved: a 64 GiB disk holds a 16 B download but not its checkpoint (the recipes' headers say so)
    args = ["fit", "--config", recipe_path, *overrides, f"--trainer.max_steps={steps}",
            "--checkpoint.every_n_steps=0", "--checkpoint.save_final=false", "--checkpoint.save_on_signal=false"]
    if gpu_gib is None:
        return [sys.executable, "-m", "moetrain.cli", *args]
    launcher = ("import sys, torch; "
                f"torch.cuda.set_per_process_memory_fraction({gpu_gib} * 2**30 / "
                "torch.cuda.get_device_properties(0).total_memory); "
                "from moetrain.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", launcher, *args]


def summarize(metrics: list[dict]) -> dict[str, Any]:
    """Steady-state figures of ``metrics.jsonl`` (the first step carries start-up costs: left out when possible)."""
    steady = metrics[1:] if len(metrics) > 1 else metrics
    out: dict[str, Any] = {"steps_logged": len(metrics)}
    if not steady:
        return out
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(metrics, metrics[1:], strict=False)] or \
        [metrics[0]["elapsed_s"]]
    out["step_s"] = round(statistics.median(times), 3)
    out["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in steady), 1)
    if "mfu" in steady[-1]:
        out["mfu"] = round(statistics.median(r["mfu"] for r in steady), 4)
    out["gpu_peak_allocated_gib"] = max((r.get("gpu/mem_peak_gib", 0.0) for r in metrics), default=0.0)
    if "gpu/alloc_retries" in metrics[-1]:  # memory pressure: cudaMalloc failed, cache freed, tried again
        out["gpu_alloc_retries"] = metrics[-1]["gpu/alloc_retries"]
    out["loss_first"], out["loss_last"] = metrics[0]["loss"], metrics[-1]["loss"]
    out["offload"] = {k: v for k, v in metrics[-1].items() if k.startswith("offload/")}
    paged = [sum(r.get(f"offload/{k}_bytes", 0.0) for k in ("h2d", "d2h", "nvme_read", "nvme_write")) for r in steady]
    out["paged_gib_per_step"] = round(statistics.median(paged) / GiB, 3)  # host<->GPU both ways, and NVMe
    # every step's figures, side by side: a step that slows, or memory that grows, shows here
    out["by_step"] = {key: [r.get(key) for r in metrics] for key in (
        "elapsed_s", "host/rss_anon_gib", "gpu/device_used_gib", "gpu/mem_reserved_gib", "gpu/alloc_retries",
        "offload/step_s", "offload/step_host_s", "offload/hot_cache_slots", "offload/experts_stepped_cpu")
        if key in metrics[-1]}
    return out


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """The recipe with ``--section.key=value`` overrides set (values read as YAML, as ``moetrain plan`` does)."""
    for arg in overrides:
        key, eq, value = arg[2:].partition("=")
        if not (arg.startswith("--") and eq):
            raise SystemExit(f"recipe_run: unexpected argument {arg!r} (overrides are --section.key=value)")
        node = recipe
        for part in key.split(".")[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[key.split(".")[-1]] = yaml.safe_load(value)
    return recipe


def selection_file(recipe: dict) -> Optional[str]:
    """The selection file an ESFT recipe trains (``model.train.routed_experts: PATH``), else None."""
    train = (recipe.get("model") or {}).get("train")
    value = train.get("routed_experts") if isinstance(train, dict) else None
    return None if value in (None, "all", "none") else str(value)


def select_experts(recipe_path: str, selection: str, *, overrides: list[str], tokens: int, top_p: float,
                   cwd: Path, env: dict, log) -> dict[str, Any]:
    """``moetrain select-experts`` into ``selection`` (under ``cwd``): its time and the experts it selected."""
    cmd = [sys.executable, "-m", "moetrain.cli", "select-experts", "--config", recipe_path, "--tokens", str(tokens),
           "--top_p", str(top_p), *overrides]
    print("$ " + " ".join(cmd), file=log, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    out: dict[str, Any] = {"select_rc": rc, "select_s": round(time.perf_counter() - t0, 1), "select_top_p": top_p}
    if rc == 0:
        record = json.loads((cwd / selection).read_text())
        model = record.get("model") or {}
        out["selected_experts"] = record["selected"]
        out["total_experts"] = len(model.get("moe_layers", [])) * int(model.get("num_experts", 0))
        out["select_tokens"] = record["tokens"]
    return out


def run_variant(recipe_path: Path, recipe: dict, overrides: list[str], *, label: str, args: argparse.Namespace,
                model_dir: Path, workdir: Path, out_dir: Path, select: bool) -> dict[str, Any]:
    """One ``moetrain fit`` of the recipe (with ``overrides``), measured; ``select``: run select-experts first."""
    log_path = out_dir / f"recipe_{label}.log"
    result: dict[str, Any] = {"bench": "recipe_run", "recipe": str(recipe_path), "variant": label,
                              "overrides": overrides, "steps": args.steps, "gpu_cap_gib": args.gpu_gib}
    config = str(REPO / recipe_path)
    with open(log_path, "w") as log:
        result.update(prepare(recipe, model_dir, workdir, log=log))
        result["model_dir_gib"] = round(sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / GiB, 2)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        root = workdir / recipe["trainer"]["default_root_dir"]
        shutil.rmtree(root, ignore_errors=True)  # before select-experts: its file usually lies in the run directory
        selection = selection_file(recipe)
        if select and selection:
            result.update(select_experts(config, selection, overrides=overrides, tokens=args.select_tokens,
                                         top_p=args.top_p,
                                         cwd=workdir, env=env, log=log))
        cap = [f"--gpu-gb={args.gpu_gib}"] if args.gpu_gib else []  # the plan of the card the run is capped to
        plan = subprocess.run([sys.executable, "-m", "moetrain.cli", "plan", "--config", config, *overrides, *cap],
                              cwd=workdir, env=env, capture_output=True, text=True)
        print(plan.stdout + plan.stderr, file=log, flush=True)
        result.update(plan_figures(plan.stdout))
        cmd = child_command(config, steps=args.steps, gpu_gib=args.gpu_gib, overrides=tuple(overrides))
        print("$ " + " ".join(cmd), file=log, flush=True)
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = PeakSampler(child.pid)
        try:
            rc = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            child.terminate()
            rc = child.wait(timeout=120)
            result["timed_out"] = True
        sampler.stop()
        result["rc"] = rc
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        result["host_peak_gib"] = round(sampler.host_peak / GiB, 2)
        result["host_used_peak_gib"] = round(sampler.host_used_peak / GiB, 2)  # machine-wide, shared pages once
        result["gpu_peak_used_gib"] = round(sampler.gpu_peak / GiB, 2)
        result["host_timeline"] = sampler.timeline
        metrics_file = root / "metrics.jsonl"
        metrics = [json.loads(x) for x in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
        result.update(summarize(metrics))
        if metrics:
            # the fit's own figure (process start to training start); older runs: wall time less training time,
            # which also counts the time after the last step (teardown, unpinning) and a killed run's stall
            result["startup_s"] = metrics[0].get("startup_s") or round(result["wall_s"] - metrics[-1]["elapsed_s"], 1)
        for profile in sorted(root.glob("profile_step_*.json")):  # --profile.step=N: where that step's time went
            result[profile.stem] = json.loads(profile.read_text())
    tail = log_path.read_text().splitlines()[-30:]
    result["log_tail"] = tail if result.get("rc") or result.get("select_rc") else tail[-3:]
    (out_dir / f"recipe_{label}.json").write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k not in ("log_tail", "host_timeline")}),
          flush=True)
    if result.get("rc") or result.get("select_rc"):
        print("\n".join(tail))
    return result


COMPARED = ("step_s", "tokens_per_s", "gpu_peak_used_gib", "gpu_peak_allocated_gib", "host_peak_gib",
            "host_used_peak_gib", "paged_gib_per_step", "startup_s", "plan_step_s", "plan_gpu_gib", "plan_host_gib",
            "plan_paged_gib_per_step")


def compare(esft: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """ESFT beside full fine-tuning: each figure of both runs and ESFT's ratio to full."""
    out: dict[str, Any] = {"bench": "recipe_run_compare", "recipe": esft["recipe"],
                           "selected_experts": esft.get("selected_experts"), "total_experts": esft.get("total_experts"),
                           "select_s": esft.get("select_s"), "rc": [esft.get("rc"), full.get("rc")]}
    for key in COMPARED:
        a, b = esft.get(key), full.get(key)
        if a is None and b is None:
            continue
        out[key] = {"esft": a, "full": b, "ratio": round(a / b, 3) if a is not None and b else None}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # the unknown --section.key=value are recipe overrides
    p.add_argument("--recipe", required=True, help="recipes/NAME.yaml")
    p.add_argument("--model-dir", default=None, help="random model directory (made when missing; default "
                   "/tmp/moetrain-models/<preset>)")
    p.add_argument("--workdir", default=None, help="the run's working directory (default /tmp/moetrain-front/<name>)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps to run")
    p.add_argument("--gpu-gib", type=float, default=None, help="cap the run's GPU memory (GiB)")
    p.add_argument("--timeout", type=float, default=540, help="seconds before a fit is stopped (SIGTERM)")
    p.add_argument("--select-tokens", type=int, default=32768, help="tokens select-experts measures (ESFT recipes)")
    p.add_argument("--top-p", type=float, default=0.2, help="select-experts --top_p (ESFT recipes)")
    p.add_argument("--compare-full", action="store_true",
                   help="an ESFT recipe, then the same recipe with --model.train=all (full fine-tuning)")
    p.add_argument("--random-init", action="store_true",
                   help="no model directory: random initialisation (--model.init_from=null), the shipped tokenizer")
    p.add_argument("--out", default="bench-out")
    args, overrides = p.parse_known_args(argv)
    if args.random_init:
        overrides = [*overrides, "--model.init_from=null"]

    recipe_path = Path(args.recipe)
    recipe = apply_overrides(yaml.safe_load(recipe_path.read_text()), overrides)
    name = recipe_path.stem
    preset = recipe["model"]["preset"]
    model_dir = DEFAULT_TOKENIZER if args.random_init else Path(args.model_dir or f"/tmp/moetrain-models/{preset}")
    workdir = Path(args.workdir or f"/tmp/moetrain-front/{name}")
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.compare_full and selection_file(recipe) is None:
        raise SystemExit(f"recipe_run: --compare-full needs an ESFT recipe (model.train.routed_experts: FILE); "
                         f"{recipe_path} trains {(recipe['model'].get('train') or 'all')!r}")
    where = dict(model_dir=model_dir, workdir=workdir, out_dir=out_dir)
    result = run_variant(recipe_path, recipe, overrides, label=name, args=args, select=True, **where)
    if not args.compare_full:
        return result
    root = recipe["trainer"]["default_root_dir"].rstrip("/")
    full_overrides = [*overrides, "--model.train=all", f"--trainer.default_root_dir={root}-full"]
    full = run_variant(recipe_path, apply_overrides(yaml.safe_load(recipe_path.read_text()), full_overrides),
                       full_overrides, label=f"{name}-full", args=args, select=False, **where)
    both = compare(result, full)
    (out_dir / f"recipe_{name}-compare.json").write_text(json.dumps(both, indent=2))
    print("RESULT " + json.dumps(both), flush=True)
    return {"esft": result, "full": full, "compare": both}


if __name__ == "__main__":
    main()
