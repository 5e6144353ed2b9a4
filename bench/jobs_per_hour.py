#!/usr/bin/env python
"""Jobs per hour against the number of workers: K small real training jobs through the app's job
manager (the same train_job the page queues), once with 1 worker and once with 2.

    python bench/jobs_per_hour.py [--jobs K] [--steps N] [--workers 1,2]

The model is a small random Llama speaking the embedded tokenizer (no download, seconds per job),
trained on the bundled sentiment task with LoRA. Each worker gets its share of the cores as torch
threads (jobqueue.threads_per_worker). Prints the CPU model, the default worker rule's answer for
this machine, and one line per worker count; writes nothing but a temporary folder it removes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import cpu_model  # noqa: E402


def tiny_model(folder: Path, hidden: int = 256, layers: int = 4) -> str:
    """A small random Llama with the embedded tokenizer, saved as a normal model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from safespace import models

    tokenizer = models.load_tokenizer(models.EMBEDDED_KEY)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_jobs(root: Path, model: str, workers: int, count: int, steps: int) -> float:
    """Seconds for `count` training jobs (one visitor each) through a manager with `workers` workers."""
    from safespace import jobs
    from safespace.config import LoraSettings, TrainSettings

    settings = TrainSettings(model=model, quantization="none", steps=steps, lr=1e-3, batch_size=8, max_length=128,
                             warmup=1, lora=LoraSettings(r=8, alpha=16, targets=("q_proj", "v_proj")))
    manager = jobs.JobManager(root, workers=workers, max_queue=count + 1)
    started = time.time()
    submitted = [(f"visitor-bench-{i:03d}", manager.submit(f"visitor-bench-{i:03d}", "train", jobs.train_job,
                                                            [("sft", settings)], "bundled:sentiment_train", 0.0, 0))
                 for i in range(count)]
    for visitor, info in submitted:
        while (now := manager.get(visitor, info.id)).active:
            time.sleep(0.05)
        if now.status != "finished":
            raise SystemExit(f"job {info.id} ended {now.status}: {now.error}")
    seconds = time.time() - started
    manager.close(wait=10)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="training jobs per worker count (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per job (default 20)")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, comma-separated")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    from safespace import jobqueue, jobs

    hf_logging.disable_progress_bar()      # one "Loading weights" bar per job would bury the figures
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)

    cores = os.cpu_count() or 1
    gpu = jobqueue.gpu_free_bytes()
    print(f"CPU: {cpu_model()} ({cores} cores); GPU free: {'none' if gpu is None else f'{gpu / 2**30:.1f} GiB'}")
    print(f"default rule: {jobs.default_workers(cores, gpu, jobs.JobManager.job_bytes())} worker(s) here "
          f"(CPU: 1 below {2 * jobqueue.CPU_CORES_PER_WORKER} cores, else one per {jobqueue.CPU_CORES_PER_WORKER}; "
          "GPU: free memory / estimated job memory)")
    tmp = Path(tempfile.mkdtemp(prefix="safespace-jobs-bench-"))
    try:
        model = tiny_model(tmp / "model")
        run_jobs(tmp / "warm", model, 1, 1, 2)          # first-use costs (imports, tokenizer, data) once
        print(f"{args.jobs} jobs x {args.steps} steps (random Llama 4x256, LoRA r=8, batch 8 x 128 tokens)")
        for workers in (int(w) for w in args.workers.split(",")):
            seconds = run_jobs(tmp / f"w{workers}", model, workers, args.jobs, args.steps)
            print(f"workers={workers}: {args.jobs / seconds * 3600:7.0f} jobs/hour  ({seconds:.1f} s for {args.jobs} "
                  f"jobs; {jobqueue.threads_per_worker(workers)} torch thread(s) per worker)", flush=True)
        print("torch threads: $SAFESPACE_THREADS (else the cores) divided among the workers; "
              f"SAFESPACE_THREADS={os.environ.get('SAFESPACE_THREADS', 'unset')}, load average "
              f"{os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
