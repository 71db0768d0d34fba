"""Plain decoding with and without ``compile=True`` on the CPU, bundled Qwen2.5-Coder-1.5B
(float32), one code prompt: the first call's time (compiling included), then two timed calls
of ``--new-tokens`` each, their prefill and verify phases, and whether the outputs are
identical. ``compile=True`` is meant for GPUs (it fuses the small kernels that eager mode
launches one by one); this says what it does on a CPU, where the matrix products dominate.

    python bench/compile_cpu.py --threads 2
"""

import argparse
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import specops  # noqa: E402
from prompts import load_prompts  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specops.pretrained import load_model
    target, tokenizer = load_model(args.target, torch.float32, progress=False)
    text = load_prompts("code", 1)[0].text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    print(f"{args.target}, {ids.shape[1]}-token prompt, {torch.get_num_threads()} threads")
    outputs, report = {}, {}
    for compiled in (False, True):
        gen = specops.SpeculativeGenerator(target, eos_token_id=[], compile=compiled)
        start = time.perf_counter()
        gen.generate(ids, max_new_tokens=args.new_tokens)
        first = time.perf_counter() - start
        calls = []
        for _ in range(2):
            start = time.perf_counter()
            out = gen.generate(ids, max_new_tokens=args.new_tokens)
            calls.append((time.perf_counter() - start, out.stats))
        outputs[compiled] = out.sequences
        report[compiled] = dict(first=first, calls=[c[0] for c in calls])
        print(f"compile={compiled}: first call {first:.1f} s; then "
              + ", ".join(f"{t:.2f} s (prefill {s.prefill_seconds:.2f}, verify "
                          f"{s.verify_seconds:.2f})" for t, s in calls), flush=True)
    report["identical"] = torch.equal(outputs[False], outputs[True])
    print("outputs identical:", report["identical"])
    return report


if __name__ == "__main__":
    main()
