"""Safe Delta's task Hessian with the rows' shared chat template run once (what defend does) and in
every row, side by side on the demo's task rows: seconds, tokens through the model, and how far the
two H differ (docs/safedelta.md).

    PYTHONPATH=. .venv/bin/python bench/task_hessian.py [--rows 64] [--rounds 3]

The rows are the demo's (examples/configs/demo.yaml: the sentiment task with 20 % harmful rows),
drawn as defend draws them; the model is the embedded one with the demo's LoRA layers (q_proj,
v_proj), whose base Linears H is taken of. Run it with nothing else running.
"""
import argparse
import random
import statistics
import time

import torch

from bench.harness import cpu_model, table
from safespace import defence, models, safedelta
from safespace.config import LoraSettings
from safespace.prepare import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="task rows (SAFESPACE_TASK_ROWS' default)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each, interleaved")
    args = parser.parse_args()
    loaded = models.load(models.EMBEDDED_KEY, quantization="none", device="cpu")
    model = models.add_lora(loaded.model, LoraSettings())          # the demo's: r 8, alpha 16, q_proj and v_proj
    names = list(safedelta.lora_layers(model))
    rows = list(prepare_data("bundled:sentiment_train", 0.2, 0).train)
    random.Random(0).shuffle(rows)
    rows = rows[:args.rows]
    seconds, tokens, H = {True: [], False: []}, {}, {}
    first = dict(model.named_modules())[names[0]].base_layer       # counts the tokens through the model
    for _ in range(args.rounds):
        for share in (True, False):
            seen = []
            handle = first.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0] * a[0].shape[1]))
            start = time.perf_counter()
            H[share] = safedelta.collect_hessians(model, names, defence._calibration_batches(
                rows, loaded.tokenizer, "cpu", tokens="all"), precision="auto", share_prefix=share)
            seconds[share].append(time.perf_counter() - start)
            handle.remove()
            tokens[share] = sum(seen)
    gap = max(float((H[True][n] - H[False][n]).abs().max() / H[False][n].abs().max()) for n in names)
    whole = statistics.median(seconds[False])
    table(["task H over every token", "s (median)", "tokens through the model", "time / whole rows'"],
          [[label, round(statistics.median(seconds[share]), 2), tokens[share],
            f"{statistics.median(seconds[share]) / whole:.2f}x"]
           for label, share in (("shared template once (defend)", True), ("every row whole", False))])
    print(f"{len(rows)} rows, {args.rounds} rounds, {torch.get_num_threads()} threads; largest |H difference| / "
          f"max |H| over the layers: {gap:.1e}; {cpu_model()}")


if __name__ == "__main__":
    main()
