"""The end-to-end benchmark scripts (bench/): prompt sets, the CPU suite, the GPU suite at tiny
shapes, and the figures.

- Prompt loaders: the documented set sizes, dataset ids, a fixed sample for a seed (a smaller
  sample is a prefix of a larger one) and another for another seed.
- ``bench_e2e.py --quick`` on tiny random Qwen2 models saved to ``tmp_path`` (a WordLevel
  tokenizer with a chat template, built here): every method runs on every category, the JSONL
  has a header and one record per prompt x method, the summary CSV one row per category x
  method, and every greedy method's output equals plain greedy (the loop is lossless).
- ``bench_gpu_e2e.py --tiny`` on the CPU: every section writes rows, the synthetic drafter's
  acceptance follows alpha, and the ceiling formula is right; no row claims CUDA graphs there.
  With a stand-in graph backend registered for the CPU, the graphs rows appear (the plain
  baseline with graphs, the loop rows with graphs, each loop row's speedup against the plain
  baseline of its own mode), and the budget skips the graphs baseline like any other.
- ``plot.py`` draws every figure from small synthetic CSV files.
"""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import prompts  # noqa: E402

transformers = pytest.importorskip("transformers")


def _installed() -> bool:
    try:
        for category in prompts.CATEGORIES:
            prompts.data_file(category)
    except prompts.PromptSetMissing:
        return False
    return True


needs_prompts = pytest.mark.skipif(not _installed(), reason="needs bench/requirements-bench.txt")


# --------------------------------------------------------------------------- prompt sets
@needs_prompts
@pytest.mark.parametrize("category, size, first_ids", [
    ("code", 164, ["HumanEval/146", "HumanEval/67", "HumanEval/68"]),
    ("chat", 80, ["137", "125", "123"]),
    ("math", 1319, ["gsm8k-test-1101", "gsm8k-test-120", "gsm8k-test-474"]),
    ("summarisation", 99, ["3nc5l260mom9579b3nffiyo4px4ofh", "3luy3gc63z0ebe6604uij6gd1e57p1",
                           "3vd82fohkqo22vp1clpeas31sk8oc2"]),
])
def test_prompt_sets(category, size, first_ids):
    everything = prompts.load_prompts(category)
    assert len(everything) == size == prompts.SIZES[category]
    assert len({p.id for p in everything}) == size          # ids are unique
    sample = prompts.load_prompts(category, 3)
    assert [p.id for p in sample] == first_ids              # the documented fixed sample
    assert prompts.load_prompts(category, 3) == sample      # deterministic
    assert [p.id for p in prompts.load_prompts(category, 10)][:3] == first_ids  # prefix
    assert [p.id for p in prompts.load_prompts(category, 3, seed=1)] != first_ids
    for p in sample:
        assert p.category == category and p.text.strip() and "==" in p.source


@needs_prompts
def test_prompt_texts():
    code = {p.id: p for p in prompts.load_prompts("code")}["HumanEval/0"]
    assert code.text.startswith(prompts.CODE_INSTRUCTION)
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in code.text
    chat = {p.id: p for p in prompts.load_prompts("chat")}["81"]
    assert chat.text.startswith("Compose an engaging travel blog post about a recent trip to "
                                "Hawaii")                   # first turn only
    assert "Start every sentence with the letter A" not in chat.text
    math_ = {p.id: p for p in prompts.load_prompts("math")}["gsm8k-test-0"]
    assert "Janet\u2019s ducks lay 16 eggs per day" in math_.text
    stories = prompts.load_prompts("summarisation")
    for p in stories:   # whole CNN stories of 178-348 words
        assert p.text.startswith(prompts.SUMMARY_INSTRUCTION)
        assert 170 < len(p.text.split()) < 360
    assert sum(p.text.startswith(prompts.SUMMARY_INSTRUCTION + "(CNN)") for p in stories) > 50
    with pytest.raises(ValueError, match="category"):
        prompts.load_prompts("poetry", 2)


# --------------------------------------------------------------------------- tiny models
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                 "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
                 "{% endif %}")


def tiny_tokenizer(texts: list[str]):
    """A WordLevel tokenizer over the words of ``texts`` (whitespace and punctuation split),
    with Qwen-like special tokens and a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in splitter.pre_tokenize_str(t)} | {"user",
                                                                                  "assistant"})
    vocab = {w: i for i, w in enumerate(specials + words[:600])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = splitter
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_pair(directory: Path, texts: list[str]) -> tuple[Path, Path]:
    """A 2-layer Qwen2 target and a draft that is the target with noisy weights (so drafts are
    partly accepted), saved with the tokenizer as Hugging Face folders."""
    tok = tiny_tokenizer(texts)
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    target = transformers.Qwen2ForCausalLM(config).eval()
    draft = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for mine, theirs in zip(draft.parameters(), target.parameters()):
            mine.copy_(theirs + 0.3 * theirs.std() * torch.randn_like(theirs))
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = directory / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def run_quiet(main, argv: list[str]):
    """Runs a script's ``main(argv)`` in this process, restoring torch's thread count."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- CPU suite
def test_method_names():
    import bench_e2e
    assert bench_e2e.method_names("plain,chain-fixed,chain-fixed-6,tree,tree-fixed", 3) == [
        "plain", "chain-fixed-3", "chain-fixed-6", "tree", "tree-fixed"]
    assert "tree-fixed" not in bench_e2e.method_names(None, 4)     # opt-in
    assert "hybrid-compare" not in bench_e2e.method_names(None, 4)
    assert bench_e2e.method_names("hybrid,hybrid-compare", 4) == ["hybrid", "hybrid-compare"]
    with pytest.raises(SystemExit, match="unknown method 'bush'"):
        bench_e2e.method_names("bush", 4)


def test_first_divergence_and_speedup_summary():
    import bench_e2e
    assert bench_e2e.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench_e2e.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench_e2e.first_divergence([1, 2], [1, 2, 3]) == 2      # one ended early
    header = dict(date="d", git_commit="c", machine="m", num_threads=1, target="t", draft="d",
                  draft_dtype="float32", batch=1, sampling=False, max_new_tokens=4, reps=2,
                  methods=["plain", "hf-assisted", "fast"])

    def run(prompt, method, speed):
        return dict(type="run", category="code", prompt_ids=[prompt], method=method,
                    tokens_per_second=speed, new_tokens=[4], stats=None,
                    identical_to_plain=method != "hf-assisted", identical_to_hf_plain=None)
    # per prompt medians: p1 plain 10, fast 20; p2 plain 10, fast 10 -> geomean sqrt(2)
    records = [run("p1", "plain", 9), run("p1", "plain", 11), run("p1", "fast", 20),
               run("p1", "fast", 20), run("p2", "plain", 10), run("p2", "fast", 10),
               run("p1", "hf-assisted", 5), run("p2", "hf-assisted", 20)]
    rows = {r["method"]: r for r in bench_e2e.summarise(records, header)}
    assert rows["fast"]["speedup_vs_plain"] == pytest.approx(math.sqrt(2))
    assert rows["fast"]["speedup_vs_hf_assisted"] == pytest.approx(math.sqrt(4 * 0.5))
    assert rows["plain"]["speedup_vs_plain"] == pytest.approx(1.0)
    assert rows["plain"]["tok_s_median"] == 10
    assert rows["hf-assisted"]["identical_to_plain"] == 0.0
    assert rows["fast"]["identical_to_hf_plain"] is None


@needs_prompts
def test_bench_e2e_quick_on_tiny_models(tmp_path):
    import bench_e2e
    texts = [p.text for c in prompts.CATEGORIES for p in prompts.load_prompts(c, 1)]
    target, draft = save_tiny_pair(tmp_path, texts)
    out = tmp_path / "out"
    summary = run_quiet(bench_e2e.main, [
        "--quick", "--prompts", "1", "--max-new-tokens", "12", "--threads", "1",
        "--target", str(target), "--draft", str(draft), "--draft-dtype", "float32",
        "--out", str(out)])
    methods = ["plain", "hf-plain", "hf-assisted", "chain-fixed-4", "chain-auto", "tree",
               "prompt-lookup", "hybrid"]
    records = [json.loads(line) for line in next(out.glob("*.jsonl")).read_text().splitlines()]
    header, runs = records[0], records[1:]
    assert header["type"] == "header" and header["methods"] == methods
    for key in ("command", "machine", "cpu", "cores", "torch", "transformers", "specops",
                "git_commit", "date"):
        assert header[key], key
    assert {c: len(ids) for c, ids in header["prompt_ids"].items()} == {
        c: 1 for c in prompts.CATEGORIES}
    assert len(runs) == len(prompts.CATEGORIES) * len(methods)
    for run in runs:
        assert run["tokens_per_second"] > 0 and run["new_tokens"][0] > 0
        # lossless greedy: every method's tokens are plain greedy's and Hugging Face's
        assert run["identical_to_plain"] and run["identical_to_hf_plain"], run
        assert run["first_divergence_vs_plain"] == [None]
        if run["method"] in ("hf-plain", "hf-assisted"):
            assert run["stats"] is None
        else:
            assert run["stats"]["new_tokens"] == run["new_tokens"][0]
            # the cost models priced by, after the warm-up call measured them
            costs = run["stats"]["cost_models"]
            kinds = {"plain": None, "chain-fixed-4": None, "chain-auto": {"model"},
                     "tree": {"tree"}, "prompt-lookup": {"lookup"},
                     "hybrid": {"model", "lookup"}}[run["method"]]
            if kinds is None:
                assert costs == {"before": None, "after": None}, costs
            else:
                assert set(costs["before"]) == set(costs["after"]) == kinds, costs
                assert all(ms > 0 for c in costs["after"].values()
                           for ms in c["verify"].values()), costs
    with summary.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench_e2e.SUMMARY_COLUMNS
    assert [(r["category"], r["method"]) for r in rows] == [
        (c, m) for c in prompts.CATEGORIES for m in methods]
    for r in rows:
        assert float(r["tok_s_p10"]) <= float(r["tok_s_median"]) <= float(r["tok_s_p90"])
        assert float(r["identical_to_plain"]) == 1.0 == float(r["identical_to_hf_plain"])
        if r["method"] == "plain":
            assert float(r["speedup_vs_plain"]) == 1.0 and float(r["tau"]) == 1.0
            assert float(r["decode_speedup_vs_plain"]) == 1.0
        if r["method"].startswith("hf-"):          # no prefill/decode split from HF
            assert r["decode_speedup_vs_plain"] == ""
        else:
            assert float(r["decode_speedup_vs_plain"]) > 0
        if r["method"] == "hf-assisted":
            assert float(r["speedup_vs_hf_assisted"]) == 1.0 and r["tau"] == ""
        # chain-auto may choose plain decoding; the cost-aware tree may verify fewer levels
        if r["method"] in ("chain-fixed-4", "tree"):
            positions = len(r["acceptance_per_position"].split())
            assert float(r["tau"]) >= 1.0 and positions == 4 or (r["method"] == "tree"
                                                                 and 1 <= positions <= 4)
            shares = [float(r[f"{p}_share"]) for p in ("prefill", "draft", "verify", "overhead")]
            assert sum(shares) == pytest.approx(1.0, abs=0.01)
    # the summary can be rebuilt from the raw records alone, identically
    written = summary.read_text()
    summary.unlink()
    assert run_quiet(bench_e2e.main, ["--resummarise", str(next(out.glob("*.jsonl")))]) == summary
    assert summary.read_text() == written


# --------------------------------------------------------------------------- GPU suite
def test_synthetic_drafter_proposes_greedy_with_probability_alpha():
    import bench_gpu_e2e
    gen = torch.Generator().manual_seed(0)
    recorded = [torch.randint(0, 50, (4000,), generator=gen).tolist()]
    drafter = bench_gpu_e2e.SyntheticDrafter(recorded, alpha=0.7, draft_lm=None, vocab_size=50)
    hits = total = 0
    for length in range(10, 3000, 8):   # 372 calls x 8 positions, each Bernoulli(0.7)
        proposal = drafter.propose([recorded[0][:length]], 8)[0]
        assert len(proposal) == 8 and all(0 <= t < 50 for t in proposal)
        hits += sum(p == g for p, g in zip(proposal, recorded[0][length:length + 8]))
        total += 8
    # std of the share: sqrt(.7 * .3 / 2976) = 0.0084; 0.04 is ~5 std (false alarm < 1e-6)
    assert abs(hits / total - 0.7) < 0.04
    assert drafter.drift_rows == 0
    assert len(drafter.propose([recorded[0][:3995]], 8)[0]) == 5   # the recording ends
    drafter = bench_gpu_e2e.SyntheticDrafter(recorded, alpha=1.0, draft_lm=None, vocab_size=50)
    assert drafter.propose([recorded[0][:20]], 3) == [recorded[0][20:23]]
    strayed = recorded[0][:20] + [(recorded[0][20] + 1) % 50]     # the target left the recording
    drafter.propose([strayed], 2)
    assert drafter.drift_rows == 1
    assert bench_gpu_e2e.ceiling_tokens(0.5, 2) == pytest.approx(1.75)
    assert bench_gpu_e2e.ceiling_tokens(1.0, 3) == 4.0 and bench_gpu_e2e.ceiling_tokens(0.0, 5) == 1


def test_bench_gpu_e2e_tiny_on_cpu(tmp_path):
    import bench_gpu_e2e
    path = run_quiet(bench_gpu_e2e.main, [
        "--tiny", "--device", "cpu", "--threads", "1", "--batches", "1,2", "--alphas", "0,1",
        "--draft-lengths", "1,3", "--out", str(tmp_path)])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench_gpu_e2e.COLUMNS
    assert all(r["status"] == "ok" and r["tiny"] == "True" for r in rows)
    # no graphs on the CPU: the specops rows say so, the Hugging Face and cost rows say nothing
    for r in rows:
        specops_row = r["section"] == "loop" or r["method"].startswith("specops")
        assert r["graphs"] == ("False" if specops_row else ""), r
    for batch in ("1", "2"):
        mine = [r for r in rows if r["batch"] == batch]
        verify = {int(r["n"]): float(r["seconds"]) for r in mine if r["section"] == "verify_cost"}
        assert sorted(verify) == [1, 2, 3, 4] and all(v > 0 for v in verify.values())
        (draft,) = [float(r["seconds"]) for r in mine if r["section"] == "draft_cost"]
        assert {r["method"] for r in mine if r["section"] == "baseline"} == {
            "specops-plain", "hf-eager", "hf-static"}
        loop = {(float(r["alpha"]), int(r["g"])): r for r in mine
                if r["section"] == "loop" and r["method"] == "synthetic"}
        assert sorted(loop) == [(0.0, 1), (0.0, 3), (1.0, 1), (1.0, 3)]
        # the agreeing draft model: built like the target, its greedy token repeats its
        # input as the target's does, so a chain's every draft is accepted
        model = {(r["method"], int(r["g"])): r for r in mine
                 if r["section"] == "loop" and r["method"] != "synthetic"}
        assert sorted(model) == [("draft-model", 1), ("draft-model", 3),
                                 ("draft-model-tree", 4)]
        for (method, g), r in model.items():
            assert r["drift_rows"] == "0" and float(r["draft_seconds"]) > 0
            if method == "draft-model":
                assert set(r["acceptance_per_position"].split()) == {"1.000"}, r
                assert float(r["tau"]) == g + 1        # 16 tokens: steps of exactly g + 1
            assert float(r["tau"]) > 1
        for (alpha, g), r in loop.items():
            assert r["drift_rows"] == "0"
            # alpha 1: every draft accepted, 16 tokens = steps of exactly g + 1; alpha 0: none
            assert float(r["tau"]) == (g + 1 if alpha else 1.0) == float(r["tau_expected"])
            first = r["acceptance_per_position"].split()[0]
            assert first == ("1.000" if alpha else "0.000")
            ceiling = int(batch) * (g + 1 if alpha else 1) / (g * draft + verify[g + 1])
            assert float(r["ceiling_tokens_per_s"]) == pytest.approx(ceiling, rel=1e-3)
        (plain,) = [float(r["tokens_per_s"]) for r in mine if r["method"] == "specops-plain"]
        for r in loop.values():
            assert float(r["speedup_vs_plain"]) == pytest.approx(
                float(r["tokens_per_s"]) / plain, rel=2e-3)
    header = json.loads(path.with_suffix(".json").read_text())["header"]
    assert header["tiny"] and header["stable_greedy"] and header["machine"]
    assert header["graphs"] is False and header["graphs_option"] == "auto"


def test_bench_gpu_e2e_output_names_keep_a_dotted_pair(tmp_path):
    # "qwen2.5-1.5b": Path.with_suffix cut such a name at its last dot, so every run of that
    # pair wrote gpu_e2e_qwen2.5-1.json/.csv over the one before
    import bench_gpu_e2e
    path = run_quiet(bench_gpu_e2e.main, [
        "--tiny", "--pair", "qwen2.5-1.5b", "--device", "cpu", "--threads", "1", "--batches",
        "1", "--alphas", "1", "--draft-lengths", "1", "--new-tokens", "4", "--out",
        str(tmp_path)])
    assert path.name.startswith("gpu_e2e_qwen2.5-1.5b_tiny_") and path.suffix == ".csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name[:-4] + ".csv",
                                                         path.name[:-4] + ".json"]


def test_bench_gpu_e2e_specops_compile_row(tmp_path):
    """--specops-compile on: specops plain decoding with compile=True as one more baseline,
    its compile time recorded (off by default on the CPU: auto means CUDA only)."""
    import bench_gpu_e2e
    path = run_quiet(bench_gpu_e2e.main, [
        "--tiny", "--device", "cpu", "--threads", "1", "--batches", "1", "--alphas", "1",
        "--draft-lengths", "1", "--new-tokens", "4", "--specops-compile", "on", "--out",
        str(tmp_path)])
    with path.open(newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["section"] == "baseline"}
    compiled = rows["specops-plain-compiled"]
    assert compiled["status"] == "ok" and compiled["compiled"] == "True"
    assert compiled["graphs"] == "False" and float(compiled["compile_seconds"]) > 0
    assert rows["specops-plain"]["compiled"] == "False"
    assert bench_gpu_e2e.parse_args(["--tiny", "--device", "cpu"]).specops_compile is False


def test_bench_gpu_e2e_graphs_option():
    import bench_gpu_e2e
    assert not bench_gpu_e2e.parse_args(["--tiny", "--device", "cpu"]).graphs
    assert bench_gpu_e2e.parse_args(["--device", "cuda"]).graphs          # auto: on for CUDA
    assert not bench_gpu_e2e.parse_args(["--device", "cuda", "--graphs", "off"]).graphs
    with pytest.raises(SystemExit):     # the CPU has no graphs: refused, never claimed
        bench_gpu_e2e.parse_args(["--tiny", "--device", "cpu", "--graphs", "on"])


class EagerReplayGraphs:
    """Stand-in graph backend for the CPU: the capture runs the step eagerly and each replay
    runs it again on the static inputs, into the captured output (as a CUDA graph would)."""

    captures = 0

    def capture(self, fn, static_inputs, warmup):
        for _ in range(warmup):
            fn(*static_inputs)
        EagerReplayGraphs.captures += 1
        output = fn(*static_inputs)

        class Replay:
            def replay(self):
                values = fn(*static_inputs)
                several = not isinstance(output, torch.Tensor)    # a step of several outputs
                for out, value in zip(output if several else (output,),
                                      values if several else (values,)):
                    out.copy_(value)
        return Replay(), output


@pytest.fixture
def cpu_graphs(monkeypatch):
    import specops.graphs
    monkeypatch.setitem(specops.graphs._BACKENDS, "cpu", EagerReplayGraphs)
    monkeypatch.setattr(EagerReplayGraphs, "captures", 0)


def test_bench_gpu_e2e_graphs_rows(tmp_path, cpu_graphs):
    import bench_gpu_e2e
    path = run_quiet(bench_gpu_e2e.main, [
        "--tiny", "--device", "cpu", "--threads", "1", "--batches", "1", "--alphas", "1",
        "--draft-lengths", "3", "--out", str(tmp_path)])
    assert EagerReplayGraphs.captures > 0
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["status"] == "ok" for r in rows)
    baselines = {r["method"]: r for r in rows if r["section"] == "baseline"}
    assert list(baselines) == ["specops-plain", "specops-plain-graphs",
                               "specops-plain-graphs-unfused", "hf-eager", "hf-static"]
    assert [r["graphs"] for r in baselines.values()] == ["False", "True", "True", "", ""]
    for r in baselines.values():
        assert float(r["tokens_per_s"]) > 0
    hf_static = float(baselines["hf-static"]["tokens_per_s"])
    for method in ("specops-plain", "specops-plain-graphs", "specops-plain-graphs-unfused"):
        assert float(baselines[method]["speedup_vs_hf_static"]) == pytest.approx(
            float(baselines[method]["tokens_per_s"]) / hf_static, rel=2e-3)
    (loop, model, tree) = [r for r in rows if r["section"] == "loop"]
    assert [r["method"] for r in (loop, model, tree)] == ["synthetic", "draft-model",
                                                           "draft-model-tree"]
    # every draft accepted: 16 tokens in 4 steps of 4, as without graphs
    for r in (loop, model):
        assert r["graphs"] == "True" and float(r["tau"]) == 4.0 and r["drift_rows"] == "0"
    assert tree["graphs"] == "True" and float(tree["tau"]) > 1 and tree["drift_rows"] == "0"
    assert float(loop["speedup_vs_plain"]) == pytest.approx(   # against the graphs baseline
        float(loop["tokens_per_s"]) / float(baselines["specops-plain-graphs"]["tokens_per_s"]),
        rel=2e-3)
    header = json.loads(path.with_suffix(".json").read_text())["header"]
    assert header["graphs"] is True and header["graphs_option"] == "auto"


def test_bench_gpu_e2e_budget_skips(tmp_path):
    import bench_gpu_e2e
    path = run_quiet(bench_gpu_e2e.main, ["--tiny", "--device", "cpu", "--budget-s", "0",
                                          "--out", str(tmp_path)])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["batch"], r["status"]) for r in rows] == [("1", "skipped (budget)"),
                                                         ("2", "skipped (budget)")]


def test_bench_gpu_e2e_budget_skips_the_graphs_baseline(tmp_path, cpu_graphs, monkeypatch):
    import bench_gpu_e2e

    class TwoChecks:
        """A budget with room for the first two checks (the batch, the eager baseline)."""

        def __init__(self, seconds):
            self.checks = 0

        def left(self):
            self.checks += 1
            return 1e9 if self.checks <= 2 else -1.0
    monkeypatch.setattr(bench_gpu_e2e, "Budget", TwoChecks)
    path = run_quiet(bench_gpu_e2e.main, [
        "--tiny", "--device", "cpu", "--threads", "1", "--batches", "1", "--alphas", "0.5",
        "--draft-lengths", "1", "--out", str(tmp_path)])
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["section"].endswith("_cost")]
    assert [(r["method"], r["graphs"], r["status"]) for r in rows] == [
        ("specops-plain", "False", "ok"), ("specops-plain-graphs", "True", "skipped (budget)"),
        ("specops-plain-graphs-unfused", "True", "skipped (budget)"),
        ("hf-eager", "", "skipped (budget)"), ("hf-static", "", "skipped (budget)"),
        ("synthetic", "True", "skipped (budget)"), ("draft-model", "True", "skipped (budget)"),
        ("draft-model-tree", "True", "skipped (budget)")]
    assert EagerReplayGraphs.captures == 0      # nothing ran with graphs


# --------------------------------------------------------------------------- figures
def write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_plot_makes_every_figure(tmp_path, capsys):
    import bench_e2e
    import bench_gpu_e2e
    import plot
    results = tmp_path / "results"
    (results / "e2e_cpu").mkdir(parents=True)
    (results / "gpu_e2e").mkdir()
    common = dict(date="2026-01-01T00:00:00+00:00", machine="test CPU", num_threads=2)
    e2e = [dict(common, category=c, label=c, method=m, batch=1, sampling=False, tok_s_median=s,
                tok_s_p10=s, tok_s_p90=s, speedup_vs_plain=s / 10, speedup_vs_hf_assisted=s / 8,
                acceptance_per_position="0.9 0.7 -" if m == "chain-auto" else "")
           for c in ("code", "chat") for m, s in (("plain", 10.0), ("hf-assisted", 8.0),
                                                  ("chain-auto", 17.0))]
    headline = results / "e2e_cpu" / "e2e_20260101T000000Z_summary.csv"
    bench_e2e.write_summary(headline, e2e)
    code = [r for r in e2e if r["category"] == "code"]
    # a newer sampling run and a newer, narrower greedy run: neither is the headline
    bench_e2e.write_summary(results / "e2e_cpu" / "e2e_20260102T000000Z_summary.csv",
                            [dict(r, sampling=True) for r in code])
    bench_e2e.write_summary(results / "e2e_cpu" / "e2e_20260103T000000Z_summary.csv", code)
    # nor a newer one over every category with fewer methods (a focused comparison)
    bench_e2e.write_summary(results / "e2e_cpu" / "e2e_20260104T000000Z_summary.csv",
                            [r for r in e2e if r["method"] != "hf-assisted"])
    summaries = sorted((results / "e2e_cpu").glob("*_summary.csv"))
    assert plot.headline_summary(summaries) == headline
    assert plot.summary_mode(plot.read_csv(summaries[1])) == "sampling"
    assert plot.summary_mode([dict(batch="4", sampling="False")]) == "batch 4"
    gpu = [dict(common, pair="llama3-8b", tiny=False, section="loop", method="synthetic",
                batch=1, alpha=a, g=g, tokens_per_s=100 * a * g, ceiling_tokens_per_s=150 * a * g,
                status="ok") for a in (0.6, 0.8) for g in (1, 2)]
    # an agreeing draft model's row has no alpha: left out of the alpha plot
    gpu += [dict(common, pair="llama3-8b", tiny=False, section="loop", method="draft-model",
                 batch=1, g=2, tokens_per_s=300, tau=3.0, status="ok")]
    gpu += [dict(common, pair="llama3-8b", tiny=False, section="baseline", batch=1, method=m,
                 tokens_per_s=t, status="ok") for m, t in (("specops-plain", 60), ("hf-eager", 40))]
    gpu_csv = results / "gpu_e2e" / "gpu_e2e_llama3-8b_x.csv"
    with gpu_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench_gpu_e2e.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(gpu)
    write_rows(results / "ops_cpu.csv", [
        dict(common, device="cpu", op=op, provider=p, B=1, K=k, T=t, V=151936, case="random",
             median_us=us)
        for op, k, t in (("chain_verify", 5, ""), ("tree_verify", "", 64))
        for p, us in (("torch-multinomial", 3000), ("specops-cpu", 100))])
    write_rows(results / "tree_attention_cpu.csv", [
        dict(common, provider=p, B=1, T=t, H=32, Hkv=8, D=128, prefix=1024, dtype=d, median_us=us)
        for t in (8, 64) for d in ("float32", "bfloat16")
        for p, us in (("sdpa-mask", 7000), ("specops-kernel", 3000))])
    write_rows(results / "kv_commit_cpu.csv", [
        dict(common, provider=p, L=32, B=1, T=64, Hkv=8, D=128, S=2048, dtype="float32",
             median_us=us) for p, us in (("torch-index", 1800), ("specops-kernel", 650))])

    written = plot.main(["--results", str(results), "--out", str(tmp_path / "figs")])
    names = sorted(p.name for p in written)
    assert names == sorted(["e2e_speedup.png", "e2e_acceptance.png", "e2e_code_modes.png",
                            "gpu_tokens_vs_alpha.png", "ops_cpu.png", "tree_attention_cpu.png",
                            "kv_commit_cpu.png"])
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path

    # nothing to draw: every figure is skipped with a message
    assert plot.main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "f2")]) == []
    out = capsys.readouterr().out
    assert out.count("skipped") == 6 and not (tmp_path / "f2").exists()


def test_plot_takes_each_case_from_its_newest_run():
    import plot
    rows = [dict(date="2026-01-02", k="a", v=1), dict(date="2026-01-03", k="a", v=2),
            dict(date="2026-01-01", k="b", v=3)]
    assert sorted(r["v"] for r in plot.newest(rows, lambda r: r["k"])) == [2, 3]


def test_plot_reads_a_run_under_todays_method_names(tmp_path):
    """A run recorded while a method name meant something else is read under today's name
    (plot.METHOD_RENAMES); other files keep theirs."""
    import plot
    for stem in ("e2e_20261127T085807Z_summary", "e2e_20990101T000000Z_summary"):
        (tmp_path / f"{stem}.csv").write_text(
            "category,method\ncode,hybrid\ncode,hybrid-lookup-first\ncode,plain\n")
    renamed = plot.read_csv(tmp_path / "e2e_20261127T085807Z_summary.csv")
    assert [r["method"] for r in renamed] == ["hybrid-compare", "hybrid", "plain"]
    kept = plot.read_csv(tmp_path / "e2e_20990101T000000Z_summary.csv")
    assert [r["method"] for r in kept] == ["hybrid", "hybrid-lookup-first", "plain"]


def test_synthetic_drafter_graphs_its_draft_step(cpu_graphs):
    """With graphs the drafter's one-token draft forward is replayed from a graph (captured
    once, kept across resets like the loop's draft runner), proposing as it does eagerly."""
    import bench_gpu_e2e
    import specops.graphs
    from specops.models import causal_lm
    shape = dict(bench_gpu_e2e.SHAPES["qwen2.5-0.5b"], **bench_gpu_e2e.TINY)
    draft = causal_lm(bench_gpu_e2e.build_model("qwen2", shape, torch.float32, "cpu", 1, False,
                                                64))
    recorded = [list(range(2, 30)), list(range(5, 33))]
    proposals = {}
    for graphs in (False, True):
        drafter = bench_gpu_e2e.SyntheticDrafter(recorded, 0.6, draft, shape["vocab_size"],
                                                 graphs=graphs)
        got = []
        for seed in (3, 4):   # two calls: reset keeps the cache and its graphed step
            drafter.reset(seed)
            got.append(drafter.propose([r[:10] for r in recorded], 3))
            got.append(drafter.propose([r[:13] for r in recorded], 2))
        proposals[graphs] = got
        assert isinstance(drafter._one_token, specops.graphs.GraphedStep) == graphs
    assert proposals[True] == proposals[False]
    assert EagerReplayGraphs.captures == 1   # one shape, captured once in both calls
