"""What a call pays before it decodes, on the CPU with the bundled pair: the cost-aware draft
length's warm-up measurement (``stats.warmup_seconds``) through ``specops.generate`` (which
keeps the measured costs per target, drafter and options) and through a reused
``SpeculativeGenerator``, and the first call of a process (the models' weights paged in).

For each drafter (prompt lookup, the bf16 draft model) it makes, in one process: an untimed
plain call (pages the target in), then two ``specops.generate`` calls and two calls of one
``SpeculativeGenerator``, each with its wall time and warm-up seconds, and checks that all
outputs are identical.

    python bench/warmup_cpu.py --threads 2
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
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specops.pretrained import load_model
    target, tokenizer = load_model("default-target", torch.float32, progress=False)
    draft, _ = load_model("default-draft", torch.bfloat16, progress=False)
    text = load_prompts("code", 1)[0].text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    print(f"{ids.shape[1]}-token prompt, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    specops.generate(target, ids, max_new_tokens=2, eos_token_id=eos)
    print(f"first call of the process (plain, 2 tokens): {time.perf_counter() - start:.2f} s",
          flush=True)
    report, outputs = {}, []
    for name, drafter in (("prompt lookup", specops.PromptLookup()), ("draft model", draft)):
        generator = specops.SpeculativeGenerator(target, drafter, eos_token_id=eos)
        calls = {"specops.generate": lambda: specops.generate(
                     target, ids, draft=drafter, max_new_tokens=args.new_tokens,
                     eos_token_id=eos),
                 "SpeculativeGenerator": lambda: generator.generate(
                     ids, max_new_tokens=args.new_tokens)}
        for how, call in calls.items():
            for n in range(2):
                start = time.perf_counter()
                out = call()
                seconds = time.perf_counter() - start
                outputs.append(out.sequences)
                report[(name, how, n)] = (seconds, out.stats.warmup_seconds)
                print(f"{name}, {how}, call {n + 1}: {seconds:.2f} s, of which cost warm-up "
                      f"{out.stats.warmup_seconds:.2f} s", flush=True)
    report["identical"] = all(torch.equal(outputs[0], o) for o in outputs)
    print("outputs identical:", report["identical"])
    return report


if __name__ == "__main__":
    main()
