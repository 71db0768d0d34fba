"""Command line: ``python -m specops generate [PROMPT]``.

Streams the target's continuation of PROMPT (from the argument, else stdin, else a short
code-completion request) to stdout as tokens are accepted, then prints on stderr what the
speculation did: tokens/s, tokens emitted per step, acceptance per draft position, the draft
lengths the controller chose and where the time went. ``--compare`` also decodes the prompt
with the target alone (the same loop without a drafter) and prints the speedup and, for greedy
decoding, whether both outputs are identical. ``--json`` prints one JSON object on stdout
instead (text, stats, comparison) and streams nothing. A short untimed call comes first
(``--no-warmup`` skips it): a model's first forwards after loading page its weights in, which
would otherwise count against the timed run.

Models are bundled names (``specops.pretrained``: ``default-target`` = Qwen2.5-Coder-1.5B
-Instruct, ``default-draft`` = Qwen2.5-Coder-0.5B-Instruct) or local Hugging Face folders.
The target runs in float32; the draft in bfloat16 by default (about twice as fast on a CPU
without AMX, and its precision only changes which tokens are proposed, never the output).
"""

import argparse
import json
import math
import sys
import time

import torch

DEFAULT_PROMPT = ("Write a Python function that checks whether a string is a palindrome, with a "
                  "docstring and two doctests.")
# End-of-turn and end-of-document markers of ChatML (Qwen): a chat reply ends with either.
CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CliError(Exception):
    """A message for the user, printed without a traceback; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m specops", description="Speculative decoding with specops.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="generate text from a prompt with speculative decoding",
        description="Generate text with speculative decoding; text on stdout, stats on stderr.")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: stdin if it is not a "
                     "terminal, else a short code-completion request)")
    gen.add_argument("--target", default="default-target",
                     help="bundled model name or model folder (default: %(default)s)")
    gen.add_argument("--draft", default=None,
                     help="draft model name or folder (default: default-draft); 'none' for "
                          "plain decoding")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--prompt-lookup", action="store_true",
                      help="draft by copying from the prompt (no draft model)")
    mode.add_argument("--hybrid", action="store_true",
                      help="prompt lookup where it matches, the draft model elsewhere")
    mode.add_argument("--tree", metavar="DEPTH,TOPK,NODES",
                      help="dynamic draft trees (EAGLE-2), e.g. 4,4,16; with --num-draft "
                           "auto (default) the size verified per step is cost-aware, with a "
                           "number every step verifies all NODES")
    gen.add_argument("--num-draft", default="auto", metavar="N|auto",
                     help="draft tokens per step, or 'auto' for the cost-aware controller")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--draft-dtype", choices=sorted(DTYPES), default="bfloat16")
    gen.add_argument("--device", default=None,
                     help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--threads", type=int, default=None,
                     help="CPU threads for torch (default: torch's choice); on a busy machine "
                          "fewer threads than cores avoid stalls in multi-token forwards")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed the prompt as is instead of through the chat template")
    gen.add_argument("--compile", action="store_true",
                     help="run the decoding steps through torch.compile (SpeculativeGenerator's "
                          "compile=True; the first steps compile, for seconds or a minute)")
    gen.add_argument("--compare", action="store_true",
                     help="also decode with the target alone and report the speedup")
    gen.add_argument("--json", action="store_true",
                     help="print text and stats as one JSON object on stdout")
    gen.add_argument("--no-warmup", action="store_true",
                     help="skip the short untimed generation that first pages the models' "
                          "weights in and measures the step costs (the timed run then "
                          "pays both, and with --compare the speedup reads low)")
    return parser


def check_options(args: argparse.Namespace) -> dict:
    """Options of the loop from the arguments; a :class:`CliError` for any bad one, before any
    model is loaded."""
    import specops

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CliError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.top_k < 0:
        raise CliError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_draft == "auto":
        num_draft = None
    else:
        try:
            num_draft = int(args.num_draft)
        except ValueError:
            raise CliError(f"--num-draft must be an integer or 'auto', got {args.num_draft!r}")
        if not 0 <= num_draft <= 64:
            raise CliError(f"--num-draft must be in 0..64, got {num_draft}")
    tree = None
    if args.tree is not None:
        try:
            depth, top_k, nodes = (int(v) for v in args.tree.split(","))
        except ValueError:
            raise CliError(f"--tree takes DEPTH,TOPK,NODES (three integers, e.g. 4,4,16), "
                           f"got {args.tree!r}")
        try:
            tree = specops.DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes,
                                       adaptive=num_draft is None)
        except ValueError as err:
            raise CliError(f"--tree: {err}")
    no_draft = args.draft is not None and args.draft.lower() == "none"
    if args.prompt_lookup and args.draft is not None and not no_draft:
        print("specops: --prompt-lookup drafts without a model, so --draft is not loaded "
              "(--hybrid uses both)", file=sys.stderr)
    if no_draft and (args.hybrid or tree is not None):
        raise CliError(f"--{'hybrid' if args.hybrid else 'tree'} needs a draft model, "
                       f"not --draft none")
    if no_draft and num_draft:
        raise CliError("--num-draft needs a drafter, not --draft none")
    return dict(num_draft_tokens=num_draft, tree=tree, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, compile=args.compile)


def check_device(name: str) -> str:
    """``name`` if torch can put a tensor there; else a :class:`CliError` with torch's reason
    (a misspelt device type, a CPU-only torch build asked for ``cuda``, a GPU index past the
    last), before any model is loaded."""
    try:
        torch.empty(1, device=torch.device(name))
    except Exception as err:   # RuntimeError, or AssertionError from a CPU-only build
        raise CliError(f"--device {name!r} cannot be used here: {err}")
    return name


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        prompt = args.prompt
    elif sys.stdin is not None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        # the newline `echo` adds is not part of the prompt; a blank stdin means none given
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt if prompt.strip() else DEFAULT_PROMPT
    else:
        prompt = DEFAULT_PROMPT
    if not prompt.strip():
        raise CliError("the prompt is empty")
    return prompt


def encode(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Prompt ids, shape ``(1, prompt_len)`` int64, through the chat template if asked and the
    tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise CliError("the prompt encodes to no tokens")
    return torch.tensor([ids], dtype=torch.int64)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's and the model's eos ids, and ChatML's
    end-of-turn and end-of-document tokens where the vocabulary has them."""
    ids = set()
    for value in (tokenizer.eos_token_id, model.config.eos_token_id,
                  getattr(model.generation_config, "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else (value or []))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in CHAT_END_TOKENS if t in vocab)
    return sorted(ids)


class TextStream:
    """Prints the new text of row 0 as tokens arrive. Decoding the whole new-token prefix each
    time (not token by token) keeps multi-byte characters whole: a prefix that ends inside one
    decodes to a trailing U+FFFD, which is held back until the next tokens complete it."""

    def __init__(self, tokenizer, out=None, enabled: bool = True):
        self.tokenizer, self.out, self.enabled = tokenizer, out or sys.stdout, enabled
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new_tokens: list[list[int]]) -> None:
        self.ids += new_tokens[0]
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed) and len(text) > len(self.printed):
            if self.enabled:
                self.out.write(text[len(self.printed):])
                self.out.flush()
            self.printed = text

    def close(self) -> str:
        self._flush(final=True)
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
        return self.printed


def load(name: str, dtype: torch.dtype, device: str, role: str):
    from transformers.utils import logging as hf_logging

    from .pretrained import ModelIntegrityError, ModelPartsMissing, load_model

    hf_logging.disable_progress_bar()  # one line per model below says the same
    start = time.perf_counter()
    try:
        model, tokenizer = load_model(name, dtype=dtype, device=device)
    except (ValueError, OSError, ModelPartsMissing, ModelIntegrityError) as err:
        raise CliError(f"cannot load the {role} {name!r}: {err}", code=1)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"specops: {role} {name} ({dtype_name}) loaded in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    return model, tokenizer


def describe(stats: dict) -> list[str]:
    total = stats["total_seconds"] or 1.0
    acceptance = " ".join(f"{a:.2f}" for a in stats["acceptance_per_position"]) or "-"
    lengths = " ".join(f"{k}:{v}" for k, v in stats["draft_lengths"].items()) or "-"
    split = " ".join(f"{phase} {stats[phase + '_seconds'] / total:.0%}"
                     for phase in ("prefill", "draft", "verify", "overhead"))
    if stats.get("warmup_seconds"):     # the cost-aware draft length's first measurement
        split += f" cost warm-up {stats['warmup_seconds'] / total:.0%}"
    return [f"{stats['new_tokens']} tokens in {stats['total_seconds']:.2f} s: "
            f"{stats['tokens_per_second']:.2f} tokens/s, {stats['steps']} steps, "
            f"{stats['mean_emitted_per_step']:.2f} tokens emitted per step",
            f"acceptance by draft position: {acceptance}",
            f"draft lengths chosen (length:steps): {lengths}",
            f"time: {split}"]


def compare(out, plain, greedy: bool) -> tuple[dict, list[str]]:
    """The speculative run against plain decoding of the same prompt (batch 1): speedup in
    tokens/s and, for greedy decoding, whether the new tokens are the same."""
    stats, plain_stats = out.stats.as_dict(), plain.stats.as_dict()
    speedup = (stats["tokens_per_second"] / plain_stats["tokens_per_second"]
               if plain_stats["tokens_per_second"] else float("nan"))
    prompt_len = out.sequences.shape[1] - max(out.num_new_tokens)
    new = out.sequences[0, prompt_len:prompt_len + out.num_new_tokens[0]].tolist()
    plain_new = plain.sequences[0, prompt_len:prompt_len + plain.num_new_tokens[0]].tolist()
    identical = new == plain_new
    if not greedy:
        verdict = "sampled, so outputs are not compared"
    elif identical:
        verdict = "outputs identical"
    else:  # allowed only at a numerical tie of the target's top two logits
        first = next((i for i, (a, b) in enumerate(zip(new, plain_new)) if a != b),
                     min(len(new), len(plain_new)))
        verdict = f"OUTPUTS DIFFER from new token {first} on"
    lines = [f"plain target decoding: {plain_stats['new_tokens']} tokens in "
             f"{plain_stats['total_seconds']:.2f} s, {plain_stats['tokens_per_second']:.2f} "
             f"tokens/s",
             f"speedup {speedup:.2f}x over plain decoding, {verdict}"]
    return {"stats": plain_stats, "speedup": speedup,
            "identical": identical if greedy else None}, lines


def warm_up(generator, input_ids: torch.Tensor) -> float:
    """Seconds of a short untimed call (2 new tokens of the same prompt) before the timed
    one. A model's first forwards after loading page its memory-mapped weights in and set up
    the CPU kernels: measured on the default pair (2-core CPU), the first call's prefill of
    the 52-token default prompt took 7.7 s, a third of that call, and the plain run after it
    (warm weights) made the speedup read 1.14x (1.93x with this call first). The call also makes the cost-aware draft length's
    warm-up measurement, which the generator keeps; the acceptance it saw is forgotten."""
    started = time.perf_counter()
    generator.generate(input_ids, max_new_tokens=2)
    generator.reset_estimates()
    return time.perf_counter() - started


def run_generate(args: argparse.Namespace) -> int:
    import specops

    options = check_options(args)
    prompt = read_prompt(args)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    draft_name = args.draft or "default-draft"
    wants_model = not args.prompt_lookup and draft_name.lower() != "none"

    target, tokenizer = load(args.target, torch.float32, device, "target")
    drafter, draft_tokenizer = None, None
    if wants_model:
        draft_model, draft_tokenizer = load(draft_name, DTYPES[args.draft_dtype], device, "draft")
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise CliError(f"the draft {draft_name!r} has another tokenizer than the target "
                           f"{args.target!r} ({len(draft_tokenizer)} vs {len(tokenizer)} "
                           f"entries): pick a draft of the target's model family, or use "
                           f"--prompt-lookup, which needs no draft model")
        drafter = specops.Hybrid(draft_model) if args.hybrid else draft_model
    elif args.prompt_lookup:
        drafter = specops.PromptLookup()

    input_ids = encode(tokenizer, prompt, chat=not args.no_chat_template).to(device)
    common = dict(eos_token_id=eos_ids(target, tokenizer), tokenizer=tokenizer, **options)
    try:
        generator = specops.SpeculativeGenerator(target, drafter, draft_tokenizer=draft_tokenizer,
                                                 **common)
    except (ValueError, TypeError) as err:
        raise CliError(str(err))

    warmup = None
    if not args.no_warmup:
        warmup = warm_up(generator, input_ids)
        print(f"specops: untimed warm-up call {warmup:.1f} s (pages the weights in; measures "
              f"step costs for a cost-aware draft length)", file=sys.stderr, flush=True)
    stream = TextStream(tokenizer, enabled=not args.json)
    out = generator.generate(input_ids, max_new_tokens=args.max_new_tokens, streamer=stream)
    text = stream.close()
    stats = out.stats.as_dict()
    report = {"prompt": prompt, "text": text, "stats": stats, "warmup_seconds": warmup}
    lines = describe(stats)

    if args.compare:
        common.update(num_draft_tokens=None, tree=None)
        plain = specops.SpeculativeGenerator(target, None, **common).generate(
            input_ids, max_new_tokens=args.max_new_tokens)
        report["plain"], more = compare(out, plain, greedy=args.temperature == 0)
        lines += more

    if args.json:
        print(json.dumps(report, indent=1))
    else:
        drafter_name = ("prompt lookup" if args.prompt_lookup else
                        "none (plain decoding)" if not wants_model else
                        f"{draft_name} ({args.draft_dtype})" + (" + prompt lookup"
                                                                 if args.hybrid else ""))
        print(f"--- target {args.target}, draft {drafter_name}, "
              f"{'tree ' + args.tree if args.tree else 'chain'}, draft length {args.num_draft}",
              file=sys.stderr)
        for line in lines:
            print(line, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 failure, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and the message
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    threads = torch.get_num_threads()
    try:
        if (getattr(args, "threads", None) or 0) > 0:  # bad values fail in check_options
            torch.set_num_threads(args.threads)
        return run_generate(args)
    except CliError as err:
        print(f"specops: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program
